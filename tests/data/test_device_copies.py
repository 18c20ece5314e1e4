"""No host-to-device copy inside an epoch, shown on the ``meta`` device standing in for CUDA.

A blocking host-to-device copy (``cpu_tensor.to("cuda")``, ``cuda_tensor.copy_(cpu_tensor)``,
``torch.tensor(values, device="cuda")``) synchronises the stream: with a captured step the host could
not queue batch k+1 before graph k ends. Meta tensors have no values, so these tests count copies,
not numbers: every copy from the CPU onto another device is recorded (a ``TorchDispatchMode`` sees
``.to``/``copy_``; ``torch.tensor``/``torch.as_tensor`` with a device are watched apart, their copy
happens below the dispatcher). The step itself reads nothing back (tests/test_fast_step.py).
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compressor.data.images import DeviceBatches
from compressor.distill.loop import EpochControl, train_one_epoch
from compressor.distill.losses import Objective
from compressor.distill.runtime import Teacher, make_runtime
from compressor.distill.step import EpochStats, Meter
from compressor.events import Reporter
from compressor.models import create_model
from compressor.pair import find_pairs

META = torch.device("meta")
NO_VALUES = re.compile(r"on meta tensors|copy out of meta|meta tensor")


class _Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name == "_to_copy" and args[0].device.type == "cpu" and kwargs.get("device", args[0].device).type != "cpu":
            self.seen.append(f"{name} {tuple(args[0].shape)} cpu -> {kwargs['device']}")
        elif name == "copy_" and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.seen.append(f"{name} {tuple(args[1].shape)} cpu -> {args[0].device}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_to_device_copies(monkeypatch):
    """Every copy from the CPU onto another device made inside the block, one line each."""
    mode = _Copies()
    for name in ("tensor", "as_tensor"):
        made = getattr(torch, name)

        def watched(data, *a, _made=made, _name=name, **k):
            device = k.get("device")
            if device is not None and torch.device(device).type != "cpu":
                mode.seen.append(f"torch.{_name}(..., device={device})")
            return _made(data, *a, **k)

        monkeypatch.setattr(torch, name, watched)
    with mode:
        yield mode.seen
    monkeypatch.undo()


def _meta_run():
    torch.manual_seed(0)
    teacher, student = create_model("wrn-10-1", 3).to(META), create_model("wrn-10-0.5", 3).to(META)
    teacher.eval().requires_grad_(False)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 16, 16, device=META))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (40,), generator=g)
    batches = DeviceBatches(x, y, 8, [0.5] * 3, [0.25] * 3, META, True, seed=0)  # the one upload: before the epoch
    # A float rate here: meta has no values for the optimizer to read a tensor rate from (on CUDA the
    # fused kernel reads make_optimizer's tensor rate on the device).
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    return Teacher(teacher, pairs), student, batches, opt


class _Steps(Reporter):
    def __init__(self):
        self.steps = 0

    def advance(self, steps: int = 1, **fields: float) -> None:
        self.steps += steps


def test_an_epoch_over_device_batches_copies_nothing_from_the_host(monkeypatch):
    teacher, student, batches, opt = _meta_run()
    runtime = make_runtime(student, teacher, Objective("at+kd"), opt, META, None)
    stats = EpochStats(sums={"ce": 1.0, "kd": 2.0, "at": 3.0, "loss": 6.0}, correct=3, seen=8, steps=1)  # a resumed epoch
    batches.set_epoch(2, start_step=1)
    progress = _Steps()
    with host_to_device_copies(monkeypatch) as copies:
        with pytest.raises(Exception) as stop:  # the epoch's end reads the meter: meta has no numbers to give
            train_one_epoch(student, batches, opt, Objective("at+kd"), 3, teacher, beta=500.0, stats=stats,
                            reporter=progress, runtime=runtime, control=EpochControl(log_every=10 ** 6))
    runtime.close()
    assert NO_VALUES.search(str(stop.value)), stop.value
    assert progress.steps == len(batches) - 1  # every step of the epoch ran (order, crops, flips, the step, the meter)
    assert copies == []


def test_the_batches_and_the_meter_load_make_no_copy_and_the_old_way_would(monkeypatch):
    """The parts alone, and the premise: the watcher does see a blocking upload."""
    _, _, batches, _ = _meta_run()
    meter = Meter(META)
    meter.start(EpochStats(), 0, names=["ce", "loss"])
    with host_to_device_copies(monkeypatch) as copies:
        for epoch in range(2):
            batches.set_epoch(epoch)
            shapes = [tuple(x.shape) for x, _ in batches]
            meter.start(EpochStats(sums={"ce": 1.5, "loss": 2.5}, correct=4, seen=8), 3)
    assert shapes == [(8, 3, 16, 16)] * 5 and copies == []
    with host_to_device_copies(monkeypatch) as copies:
        torch.randint(0, 9, (8,)).to(META)  # how crop offsets used to arrive
        meter.sums.copy_(torch.zeros(2, dtype=torch.float64))  # how the meter used to load
        torch.tensor([1.0], device=META)
    assert copies == ["_to_copy (8,) cpu -> meta", "copy_ (2,) cpu -> meta", "torch.tensor(..., device=meta)"]


def test_on_the_cpu_the_batches_are_the_ones_of_before():
    """The device generator on the CPU draws what the CPU generator drew before: resumes and recorded
    runs repeat. (Batch k of epoch e still depends on (seed, e, k) alone.)"""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (20,), generator=g)
    b = DeviceBatches(x, y, 4, [0.5] * 3, [0.25] * 3, torch.device("cpu"), True, seed=7)
    b.set_epoch(3)
    got = list(b)
    # the previous implementation, written out
    order = torch.randperm(20, generator=torch.Generator().manual_seed(7 * 1_000_003 + 3))
    for step, (bx, by) in enumerate(got):
        idx = order[step * 4:(step + 1) * 4]
        gen = torch.Generator().manual_seed((7 * 1_000_003 + 3) * 1_000_003 + step)
        dy, dx = torch.randint(0, 9, (4,), generator=gen), torch.randint(0, 9, (4,), generator=gen)
        flip = torch.rand(4, generator=gen) < 0.5
        padded = torch.nn.functional.pad(x[idx], (4, 4, 4, 4))
        crops = torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(4)])
        crops = torch.where(flip.view(4, 1, 1, 1), crops.flip(3), crops)
        assert torch.equal(by, y[idx]) and torch.equal(bx, (crops.float() - 127.5) / 63.75)
    b.set_epoch(3, start_step=2)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(list(b), got[2:]))  # a resumed epoch replays its batches
