"""One rank of the 2-process distillation in test_ddp.py, started by torch.distributed.run.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distill/ddp_worker.py DATA OUT

Each rank distils WRN-10-0.5 from a WRN-10-1 teacher (AT+KD, gloo on the CPU) and writes
OUT/rank<r>.json: a hash of its final student state_dict, the steps it ran, its metrics, and
(rank 0) an unsharded evaluation of the final student for comparison.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from compressor import distributed  # noqa: E402
from compressor.config import load_config  # noqa: E402
from compressor.data.images import DeviceBatches
from compressor.data.open import open_dataset
from compressor.distill.loop import fit, objective_from
from compressor.distill.runtime import Teacher
from compressor.evaluate import evaluate
from compressor.events import Reporter  # noqa: E402
from compressor.models import create_model  # noqa: E402
from compressor.pair import find_pairs


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Steps(Reporter):
    def __init__(self):
        self.steps = 0

    def advance(self, steps: int = 1, **fields: float) -> None:
        self.steps += steps


def main() -> None:
    data_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    rank, device = distributed.init("cpu")
    assert rank.world_size == 2 and rank.backend == "gloo", rank
    data = open_dataset(data_dir, image_size=16)
    cfg = load_config("demo", {"train": {"epochs": 2, "batch_size": 8, "seed": 3}})
    mean, std = data.channel_stats()
    torch.manual_seed(0)
    teacher, student = create_model("wrn-10-1", data.num_classes), create_model("wrn-10-0.5", data.num_classes)
    initial = state_hash(student)
    pairs = find_pairs(student, teacher, torch.zeros(1, *data.input_size), "all")
    counter = Steps()
    result = fit(student, data, cfg, out / "run", mean, std, Teacher(teacher, pairs), objective_from(cfg, "at+kd"),
                 torch.device(device), reporter=counter)
    record = {"rank": rank.rank, "hash": state_hash(student), "initial": initial, "steps": counter.steps,
              "final": result.final, "pairs": len(pairs)}
    if rank.is_main:  # the whole test set in one process, to check the sharded and reduced evaluation
        whole = DeviceBatches(data.test_x, data.test_y, 5, mean, std, torch.device("cpu"), False)
        record["unsharded"] = evaluate(student, whole).to_dict()
    (out / f"rank{rank.rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


if __name__ == "__main__":
    main()
