from compressor.models.registry import Arch, create_model, known_names, parse_arch

__all__ = ["Arch", "create_model", "known_names", "parse_arch"]
