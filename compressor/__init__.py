"""atc: compress a trained CNN teacher into a smaller student with attention transfer.

    from compressor import attention_map, at_loss, kd_loss
"""

__version__ = "0.1.0"

from compressor.errors import AtcError  # noqa: E402
from compressor.distill.losses import at_loss, attention_map, kd_loss
from compressor.models import create_model  # noqa: E402

__all__ = ["AtcError", "__version__", "at_loss", "attention_map", "create_model", "kd_loss"]
