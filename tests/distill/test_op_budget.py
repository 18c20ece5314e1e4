"""The operation budget of one AT+KD training step, WRN-16-2 → WRN-16-1 (the launch-bound pair of
the paper's CIFAR recipe): a change that adds kernel launches to the step shows here.

How the numbers were obtained: this test's own count, a ``TorchDispatchMode`` that counts every aten
op dispatched during one ``EagerStep`` call (teacher forward under inference mode, student forward,
the three AT pairs and KD, backward, fused SGD, the device meter), after one step that made the
momentum buffers and the meter; on the CPU, fp32, torch 2.14.1: 483 ops, of which 359 are not views
or aliases (``detach``, ``view``, ``expand``, ``t``, ``unsqueeze`` and the profiler's record
functions produce no kernel). On CUDA the dispatch differs a little (cuDNN batch norm), and the
eager step launches roughly one kernel per counted non-view op; the CUDA graph replays them as one.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compressor.distill.losses import Objective
from compressor.distill.runtime import Teacher, make_runtime
from compressor.distill.step import EpochStats
from compressor.models import create_model
from compressor.pair import find_pairs

PINNED_TORCH = "2.14"
ALL_OPS, COMPUTE_OPS = 483, 359


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.compute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        aliases = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        self.compute += not (aliases or func.namespace == "profiler")
        return func(*args, **(kwargs or {}))


def _step_ops() -> _Count:
    torch.manual_seed(0)
    teacher, student = create_model("wrn-16-2", 10), create_model("wrn-16-1", 10)
    teacher.eval().requires_grad_(False)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 32, 32))
    opt = torch.optim.SGD([{"params": list(student.parameters()), "lr": torch.full((), 0.1)}], lr=0.1, momentum=0.9,
                          weight_decay=5e-4, fused=True)
    runtime = make_runtime(student, Teacher(teacher, pairs), Objective("at+kd"), opt, torch.device("cpu"), None,
                           example=torch.randn(2, 3, 32, 32))
    assert runtime.notes == [] and len(pairs) == 3
    runtime.step.meter.start(EpochStats(), 0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    runtime.step(x, y, None)  # the first step creates the momentum buffers and the meter
    count = _Count()
    with count:
        runtime.step(x, y, None)
    runtime.close()
    return count


def test_an_at_kd_step_of_wrn16_2_to_wrn16_1_stays_within_its_op_budget():
    count = _step_ops()
    total = sum(count.ops.values())
    assert count.ops["aten._fused_sgd_.tensor_lr"] == 1  # one fused update with the device learning rate
    assert count.ops["aten._local_scalar_dense.default"] == 0  # nothing read back to the host
    if torch.__version__.startswith(PINNED_TORCH):
        assert (total, count.compute) == (ALL_OPS, COMPUTE_OPS), (
            f"the step now dispatches {total} aten ops ({count.compute} not views); it was {ALL_OPS} ({COMPUTE_OPS}). "
            f"If the change is meant, update the pinned numbers; most common: {count.ops.most_common(8)}")
    else:  # other torch versions decompose a little differently
        assert total == pytest.approx(ALL_OPS, rel=0.1) and count.compute == pytest.approx(COMPUTE_OPS, rel=0.1)
