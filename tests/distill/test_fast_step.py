"""The sync-free training step: same arithmetic as the per-step loop, no host reads per step,
divergence still named by step, stage outputs without hooks, and when CUDA graphs apply."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from compressor.data.images import DeviceBatches
from compressor.device import Speed
from compressor.distill.failures import Diverged
from compressor.distill.loop import EpochControl, train_one_epoch
from compressor.distill.losses import Objective, distillation_terms
from compressor.distill.runtime import Teacher, make_runtime
from compressor.distill.step import EagerStep, GraphedStep, graph_capture_applies
from compressor.errors import ConfigError
from compressor.models import create_model
from compressor.pair import Taps, find_pairs, stage_outputs

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
AT_KD = Objective("at+kd")


def _setup(seed: int = 0, n: int = 40, batch: int = 8):
    torch.manual_seed(seed)
    teacher, student = create_model("wrn-10-1", 3), create_model("wrn-10-0.5", 3)
    teacher.eval().requires_grad_(False)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 16, 16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = DeviceBatches(x, y, batch, [0.5] * 3, [0.25] * 3, CPU, True, seed=seed)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return teacher, student, pairs, batches, opt


def _old_loop(student, teacher, pairs, batches, opt, objective):
    """The loop as it was: hooks, and a host read of every term and the accuracy at every step."""
    s_taps, t_taps = Taps(student, [p.student.module for p in pairs]), Taps(teacher, [p.teacher.module for p in pairs])
    sums: dict[str, float] = {}
    correct = seen = 0
    student.train()
    for x, y in batches:
        with torch.no_grad():
            t_logits = teacher(x)
        logits = student(x)
        maps = list(zip(s_taps.take([p.student.module for p in pairs]), t_taps.take([p.teacher.module for p in pairs])))
        terms = distillation_terms(objective, logits, y, t_logits, maps)
        assert all(torch.isfinite(v) for v in terms.values())
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
        correct, seen = correct + int((logits.argmax(1) == y).sum()), seen + len(y)
    s_taps.remove(), t_taps.remove()
    return sums, correct, seen


def test_sync_free_step_gives_the_weights_and_sums_of_the_per_step_loop():
    teacher, student, pairs, batches, opt = _setup()
    sums, correct, seen = _old_loop(student, teacher, pairs, batches, opt, AT_KD)
    old = {k: v.clone() for k, v in student.state_dict().items()}

    teacher, student, pairs, batches, opt = _setup()
    runtime = make_runtime(student, Teacher(teacher, pairs), AT_KD, opt, CPU, None, example=torch.randn(2, 3, 16, 16))
    assert runtime.notes == [] and runtime.student.traced and runtime.teacher.traced  # FX, no hooks
    stats = train_one_epoch(student, batches, opt, AT_KD, 1, Teacher(teacher, pairs), runtime=runtime, control=EpochControl(log_every=2))
    runtime.close()
    for k, v in student.state_dict().items():  # the same kernels in the same order: bit for bit on the CPU
        assert torch.equal(v, old[k]), k
    assert stats.sums == sums and stats.correct == correct and stats.seen == seen == 40 and stats.steps == 5


@contextlib.contextmanager
def _no_host_reads():
    """Every way a tensor's value reaches Python raises inside the block."""
    def refuse(self, *a, **k):
        raise AssertionError("a host read of a tensor inside the step")

    names = ("item", "tolist", "__float__", "__int__", "__bool__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_a_step_reads_nothing_back_and_the_meter_reads_once():
    teacher, student, pairs, batches, opt = _setup()
    runtime = make_runtime(student, Teacher(teacher, pairs), AT_KD, opt, CPU, None)
    step = runtime.step
    from compressor.distill.step import EpochStats
    stats = EpochStats()
    step.meter.start(stats, 0)
    data = list(batches)
    with _no_host_reads():
        for x, y in data:
            step(x, y, None)
    step.meter.read(stats, 1, len(data) - 1)
    runtime.close()
    assert set(stats.sums) == {"ce_weighted", "kd", "at", "loss"} and 0 <= stats.correct <= 40
    assert stats.sums["loss"] == pytest.approx(sum(v for k, v in stats.sums.items() if k != "loss"), rel=1e-5)


class _Poisoned:
    """Batches whose step ``bad`` (0-based) holds a NaN image."""

    def __init__(self, batches, bad: int):
        self.batches, self.bad, self.device, self.start_step = batches, bad, batches.device, 0

    def __iter__(self):
        for i, (x, y) in enumerate(self.batches):
            if i == self.bad:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y


def test_divergence_names_the_first_bad_step_although_it_is_read_later():
    teacher, student, pairs, batches, opt = _setup()
    with pytest.raises(Diverged, match=r"the ce_weighted loss term became nan at epoch 3, step 3;"):
        train_one_epoch(student, _Poisoned(batches, 2), opt, AT_KD, 3, Teacher(teacher, pairs), control=EpochControl(log_every=50))


def test_untraceable_model_falls_back_to_hooks_with_a_note():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            a = self.conv(x)
            if a.sum() > 0:  # data-dependent control flow: FX cannot trace it
                a = a * 2
            return self.fc(a.mean((2, 3)))

    model = Branchy()
    run, note = stage_outputs(model, ["conv"], torch.randn(2, 3, 8, 8))
    assert not run.traced and note.startswith("Branchy: attention maps taken with forward hooks (FX tracing failed")
    logits, maps = run(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, 3) and maps[0].shape == (2, 4, 8, 8)
    run.remove()
    assert not model.conv._forward_hooks


def test_traced_stage_outputs_share_the_models_parameters():
    _, student, pairs, _, _ = _setup()
    run, note = stage_outputs(student, [p.student.module for p in pairs], torch.randn(2, 3, 16, 16))
    assert note is None and run.traced
    assert {id(p) for p in run.graph.parameters()} <= {id(p) for p in student.parameters()}
    assert list(student.state_dict()) == list(create_model("wrn-10-0.5", 3).state_dict())  # the student is untouched


@pytest.mark.parametrize("kwargs, applies, why", [
    (dict(device=CUDA, requested=None, objective=AT_KD), True, ""),
    (dict(device=CUDA, requested=True, objective=AT_KD), True, ""),
    (dict(device=CUDA, requested=False, objective=AT_KD), False, "turned off (--no-cuda-graphs)"),
    (dict(device=CPU, requested=None, objective=AT_KD), False, "training on cpu, not on a CUDA device"),
    (dict(device=CUDA, requested=None, objective=Objective("at", gradient=True)), False, "gradient attention's double backward"),
    (dict(device=CUDA, requested=None, objective=AT_KD, scaler=object()), False, "fp16 loss scaling"),
    (dict(device=CUDA, requested=None, objective=AT_KD, world_size=2), False, "over 2 processes"),
    (dict(device=CUDA, requested=None, objective=AT_KD, device_resident=False), False, "streamed data"),
    (dict(device=CUDA, requested=None, objective=AT_KD, compiled=True), False, "--compile"),
])
def test_when_cuda_graphs_apply(kwargs, applies, why):
    ok, reason = graph_capture_applies(**kwargs)
    assert ok is applies and why in reason and (reason == "") == (why == "")


def test_on_the_cpu_the_runtime_falls_back_to_the_eager_step():
    teacher, student, pairs, _, opt = _setup()
    auto = make_runtime(student, Teacher(teacher, pairs), AT_KD, opt, CPU, None, speed=Speed())
    assert type(auto.step) is EagerStep and auto.notes == []  # the default on a CPU: nothing to say in the log
    assert auto.step.status.state == "off" and auto.step.status.why == "training on cpu, not on a CUDA device"
    assert not isinstance(auto.step, GraphedStep)
    with pytest.raises(ConfigError, match="^--cuda-graphs cannot be honoured here: training on cpu"):  # asked for: an error
        make_runtime(student, Teacher(teacher, pairs), AT_KD, opt, CPU, None, speed=Speed(cuda_graphs=True))
