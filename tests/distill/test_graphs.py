"""The CUDA-graph training step on the CPU, through a fake of ``torch.cuda``'s graph API (tests/fake_cuda.py).

The fake records a capture without running it, replays the recorded aten ops on the captured tensors
(Python numbers baked in, as a real graph bakes them), keeps memory pools the way the caching
allocator does and raises its ``use_count > 0`` assert when a capture goes into a pool whose graphs
are all gone. So these tests see what a GPU run would: how many captures a run makes, whether every
full batch replays, whether a learning-rate milestone or a β decay reaches the graph, whether the
tensors the graph reads are still the ones the run uses, and whether the self-check catches a graph
that computes something else.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from compressor.config import load_config
from compressor.data.images import DeviceBatches, ImageData
from compressor.device import Speed
from compressor.distill import loop
from compressor.distill.failures import StopRequested
from compressor.distill.loop import FitOptions, fit, train_one_epoch
from compressor.distill.losses import Objective
from compressor.distill.runtime import Teacher, make_runtime
from compressor.distill.state import load_optimizer_state
from compressor.distill.step import EagerStep, EpochStats, GraphedStep, GraphStatus, graph_capture_applies
from compressor.errors import ConfigError
from compressor.events import Reporter
from compressor.models import create_model
from compressor.pair import find_pairs
from tests import fake_cuda

CPU = torch.device("cpu")
AT_KD = Objective("at+kd")
TRAIN, BATCH, EPOCHS = 44, 8, 3  # five full batches and a partial one of four per epoch
FULL = TRAIN // BATCH
WARMUP = 3


class Log(Reporter):
    def __init__(self, stop_at: tuple[int, int] | None = None):
        self.lines, self.stop_at, self.epoch, self.steps = [], stop_at, 0, 0

    def info(self, message: str) -> None:
        self.lines.append(message)

    def task(self, description: str, total: int) -> None:
        self.epoch, self.steps = self.epoch + 1, 0

    def advance(self, steps: int = 1, **fields: float) -> None:
        self.steps += steps
        if (self.epoch, self.steps) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)


def _data() -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (TRAIN + 12, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (TRAIN + 12,), generator=g)
    return ImageData("toy", x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:], ["a", "b", "c"])


CFG = load_config("demo", {"train": {"epochs": EPOCHS, "batch_size": BATCH, "milestones": [1, 2], "seed": 1},
                           "distill": {"beta_schedule": "decay"}, "data": {"crop_padding": 2}})


@pytest.fixture
def keep_partial_batches(monkeypatch):
    """fit drops a last partial training batch; keep it, so that the eager path for it is exercised too."""
    made = loop.make_batches

    def make(*a, **k):
        train, test = made(*a, **k)
        train.drop_last = False
        return train, test

    monkeypatch.setattr(loop, "make_batches", make)


@pytest.fixture
def steps(monkeypatch):
    """Every GraphedStep built, and the batch sizes of the eager steps run outside a capture."""
    built, eager_sizes = [], []
    init, run = GraphedStep.__init__, EagerStep.run

    def record_init(self, *a, **k):
        init(self, *a, **k)
        built.append(self)

    def record_run(self, x, y):
        fake = isinstance(getattr(torch.cuda.is_current_stream_capturing, "__self__", None), fake_cuda.FakeCuda)
        if not (fake and torch.cuda.is_current_stream_capturing()):
            eager_sizes.append(len(y))
        return run(self, x, y)

    monkeypatch.setattr(GraphedStep, "__init__", record_init)
    monkeypatch.setattr(EagerStep, "run", record_run)
    return built, eager_sizes


def _fit(tmp_path, name: str, speed: Speed, reporter: Reporter | None = None, resume: bool = False):
    torch.manual_seed(0)
    teacher, student = create_model("wrn-10-1", 3), create_model("wrn-10-0.5", 3)
    teacher.eval().requires_grad_(False)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 16, 16))
    data = _data()
    mean, std = data.channel_stats()
    result = fit(student, data, CFG, tmp_path / name, mean, std, Teacher(teacher, pairs), AT_KD, CPU, reporter or Log(),
                 FitOptions(resume=resume, speed=speed))
    return student, result


def _same_weights(a, b) -> None:
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_one_capture_serves_a_whole_run_with_milestones_and_beta_decay(monkeypatch, tmp_path, keep_partial_batches, steps):
    eager_model, eager = _fit(tmp_path, "eager", Speed(cuda_graphs=False))
    cuda = fake_cuda.install(monkeypatch)
    built, eager_sizes = steps
    eager_sizes.clear()  # the reference run's
    log = Log()
    model, result = _fit(tmp_path, "graph", Speed(), log)

    assert len(cuda.captures) == 1 and len(cuda.pools) == 1  # not once per learning rate or β
    assert cuda.replays == EPOCHS * FULL - WARMUP  # every full batch after the warm-up, the self-check's included
    assert eager_sizes == [BATCH] * (WARMUP + 1) + [TRAIN % BATCH] + [TRAIN % BATCH] * (EPOCHS - 1)  # warm-up, check, tails
    assert result.cuda_graphs == GraphStatus("captured", 1, EPOCHS * FULL - WARMUP)
    assert [r["cuda_graphs"] for r in result.history] == ["captured"] * EPOCHS
    assert [r["lr"] for r in result.history] == pytest.approx([0.05, 0.01, 0.002])
    # warm-up and capture ran on the step's own stream; the caller's stream is current again
    (step,) = built
    assert cuda.current is cuda.default and set(cuda.entered) == {step.stream} and cuda.captures[0].stream is step.stream
    assert [line for line in log.lines if "CUDA graph" in line] == [f"CUDA graphs: the training step ran as a CUDA graph "
                                                                    f"(1 capture, {EPOCHS * FULL - WARMUP} replays)"]
    # the replays did the work: milestones and β decay reached the graph, bit for bit on the CPU
    _same_weights(model, eager_model)
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in eager.history]
    assert eager.cuda_graphs == GraphStatus("off", why="turned off (--no-cuda-graphs)")


def test_the_graph_reads_the_tensors_the_run_uses_across_epochs_and_resume(monkeypatch, tmp_path, steps):
    eager_model, eager = _fit(tmp_path, "eager", Speed(cuda_graphs=False))
    cuda = fake_cuda.install(monkeypatch)
    built, _ = steps
    with pytest.raises(StopRequested):
        _fit(tmp_path, "run", Speed(), Log(stop_at=(2, 3)))  # a SIGTERM three steps into epoch 2
    assert len(cuda.captures) == 1
    model, result = _fit(tmp_path, "run", Speed(), resume=True)
    assert len(cuda.captures) == 2 and result.cuda_graphs.state == "captured"  # the resumed run captured once

    step = built[-1]
    opt = step.eager.optimizer
    live = {"static inputs": [r for rec in step.graphs.values() for r in (rec.x, rec.y)],
            "parameters": [p for g in opt.param_groups for p in g["params"]],
            "momentum buffers": [opt.state[p]["momentum_buffer"] for g in opt.param_groups for p in g["params"]],
            "BN buffers": [b for b in model.buffers()], "lr": [g["lr"] for g in opt.param_groups],
            "beta": [step.eager.beta], "meter": step.meter.tensors()}
    for kind, tensors in live.items():
        assert tensors and cuda.live_tensors_read(tensors), kind  # still the graph's tensors after meter.start, epochs, resume
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([0.002] * 2)  # the last milestone reached them
    _same_weights(model, eager_model)  # stopped, resumed and graphed: still the eager run
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in eager.history]


def test_resume_keeps_the_learning_rate_tensors_on_the_device():
    model = torch.nn.Linear(3, 2)
    lrs = [torch.full((), 0.1, device="meta"), torch.full((), 0.1, device="meta")]
    meta = torch.nn.Linear(3, 2, device="meta")
    opt = torch.optim.SGD([{"params": [meta.weight], "lr": lrs[0]}, {"params": [meta.bias], "lr": lrs[1]}], lr=0.1, momentum=0.9)
    saved = torch.optim.SGD([{"params": [model.weight], "lr": torch.tensor(0.02)}, {"params": [model.bias], "lr": torch.tensor(0.02)}],
                            lr=0.1, momentum=0.9).state_dict()
    load_optimizer_state(opt, saved)
    assert [g["lr"] for g in opt.param_groups] == lrs and all(g["lr"] is t for g, t in zip(opt.param_groups, lrs))
    assert all(t.device.type == "meta" for t in lrs)  # not the CPU tensors the file held
    cpu_lr = torch.full((), 0.1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": cpu_lr}], lr=0.1)
    load_optimizer_state(opt, torch.optim.SGD([{"params": [model.weight], "lr": torch.tensor(0.004)}], lr=0.1).state_dict())
    assert opt.param_groups[0]["lr"] is cpu_lr and float(cpu_lr) == pytest.approx(0.004)


def test_a_capture_that_fails_falls_back_to_eager_and_says_so(monkeypatch, tmp_path):
    eager_model, _ = _fit(tmp_path, "eager", Speed(cuda_graphs=False))
    cuda = fake_cuda.install(monkeypatch, fail_capture=f"{fake_cuda.CAPTURE_SYNC}\nsecond line")
    log = Log()
    model, result = _fit(tmp_path, "graph", Speed(), log)
    assert result.cuda_graphs.state == "failed" and cuda.replays == 0 and not cuda.captures
    assert result.cuda_graphs.why == f"capture failed (RuntimeError: {fake_cuda.CAPTURE_SYNC})"
    assert [r["cuda_graphs"] for r in result.history] == ["failed"] * EPOCHS
    assert [line for line in log.lines if "CUDA graph" in line] == [
        f"CUDA graphs failed: capture failed (RuntimeError: {fake_cuda.CAPTURE_SYNC}); the eager step ran instead"]
    assert cuda.current is cuda.default
    _same_weights(model, eager_model)  # nothing of the failed capture is left in the run


def _toy(seed: int = 0, n: int = 40, drop_last: bool = True):
    torch.manual_seed(seed)
    teacher, student = create_model("wrn-10-1", 3), create_model("wrn-10-0.5", 3)
    teacher.eval().requires_grad_(False)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 16, 16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = DeviceBatches(x, y, BATCH, [0.5] * 3, [0.25] * 3, CPU, True, seed=seed, drop_last=drop_last)
    opt = torch.optim.SGD([{"params": list(student.parameters()), "lr": torch.full((), 0.05)}], lr=0.05, momentum=0.9, fused=True)
    return Teacher(teacher, pairs), student, batches, opt


def _epochs(graphs: bool, epochs: int = 2):
    teacher, student, batches, opt = _toy()
    runtime = make_runtime(student, teacher, AT_KD, opt, CPU, None, speed=Speed(cuda_graphs=graphs))
    for e in range(epochs):
        batches.set_epoch(e)
        train_one_epoch(student, batches, opt, AT_KD, e + 1, teacher, beta=500.0 * (e + 1), runtime=runtime)
    runtime.close()
    return student, runtime.step


def test_the_self_check_catches_a_graph_that_skips_the_update_and_leaves_the_eager_result(monkeypatch):
    eager_model, _ = _epochs(False)
    cuda = fake_cuda.install(monkeypatch)
    run = fake_cuda.FakeGraph._run

    def without_the_update(graph):  # a broken graph: everything but the optimizer step
        kept = graph.ops
        graph.ops = [op for op in kept if "sgd" not in op[0]._schema.name]
        try:
            run(graph)
        finally:
            graph.ops = kept

    monkeypatch.setattr(fake_cuda.FakeGraph, "_run", without_the_update)
    model, step = _epochs(True)
    assert step.status.state == "failed" and step.status.captures == 1 and cuda.replays == 1  # the check's replay only
    assert step.status.why.startswith("self-check failed: the graphed step changed the parameters differently")
    _same_weights(model, eager_model)  # the check ran both and kept the eager step's result


def test_the_self_check_passes_a_faithful_graph_and_compares_loss_terms(monkeypatch):
    fake_cuda.install(monkeypatch)
    _, step = _epochs(True, epochs=1)
    assert step.status == GraphStatus("captured", 1, FULL - WARMUP)
    from compressor.distill.step import _disagreement

    rec = next(iter(step.graphs.values()))
    before = {k: [t.detach().clone() for t in ts] for k, ts in step.eager.state_tensors().items()}
    same = dict(before)
    terms = {k: v.clone() for k, v in rec.terms.items()}
    assert _disagreement(terms, rec.terms, before, same, same, 2 ** -5) == ""
    off = {k: v * 1.1 if k == "at" else v for k, v in terms.items()}  # an AT term 10 % away: a stale β
    assert _disagreement(off, rec.terms, before, same, same, 2 ** -5).startswith("self-check failed: the graphed step's at term")


def test_a_new_batch_shape_gets_a_fresh_capture_in_a_fresh_pool_and_a_partial_batch_runs_eager(monkeypatch):
    cuda = fake_cuda.install(monkeypatch)
    teacher, student, _, opt = _toy()
    runtime = make_runtime(student, teacher, AT_KD, opt, CPU, None, speed=Speed())
    step = runtime.step
    step.meter.start(EpochStats(), 0)
    g = torch.Generator().manual_seed(3)
    batch = lambda n: (torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g))  # noqa: E731
    for n in [8] * 5 + [4] + [12] * 5 + [8, 12, 4]:
        step(*batch(n), None)
    runtime.close()
    assert len(cuda.captures) == 2 and cuda.captures[0].pool != cuda.captures[1].pool
    assert step.status == GraphStatus("captured", 2, 2 + 2 + 2)  # per shape: the check's replay and one more, then one each


def test_the_fake_refuses_a_pool_whose_graphs_are_all_gone(monkeypatch):
    """The allocator behaviour the step is built around: dropping the only graph of a pool and capturing
    into the same pool again fails (the old step did exactly this at every learning-rate change)."""
    cuda = fake_cuda.install(monkeypatch)
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    x = torch.ones(3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        y = x * 2
    x.fill_(5.0)
    graph.replay()
    assert y.tolist() == [10.0] * 3 and cuda.replays == 1  # the replay read x's new value into y's memory
    second = torch.cuda.CUDAGraph()
    with torch.cuda.graph(second, pool=pool, stream=stream):  # sharing with a live graph is fine
        x * 3
    del graph, second
    with pytest.raises(RuntimeError, match=r"use_count > 0 INTERNAL ASSERT FAILED"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=pool, stream=stream):
            x * 4
    # as in PyTorch, a capture that fails to begin leaves its stream current (the step wraps capture in
    # a stream context of its own for this reason)
    assert cuda.current is stream
    cuda.current = cuda.default
    with pytest.raises(RuntimeError, match="operation not permitted when stream is capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            float(x.sum())
    assert cuda.current is cuda.default


@pytest.mark.parametrize("kwargs, why", [
    (dict(device=CPU), "training on cpu, not on a CUDA device"),
    (dict(objective=Objective("at", gradient=True)), "gradient attention's double backward"),
    (dict(scaler=object()), "fp16 loss scaling"),
    (dict(world_size=2), "data-parallel training over 2 processes"),
    (dict(device_resident=False), "streamed data"),
    (dict(compiled=True), "--compile"),
])
def test_explicit_cuda_graphs_that_cannot_be_honoured_is_an_error_and_the_default_falls_back(kwargs, why):
    args = dict(device=torch.device("cuda"), objective=AT_KD) | kwargs
    with pytest.raises(ConfigError, match=rf"^--cuda-graphs cannot be honoured here: {why}.*; drop --cuda-graphs"):
        graph_capture_applies(requested=True, **args)
    applies, reason = graph_capture_applies(requested=None, **args)
    assert not applies and reason.startswith(why)
    assert graph_capture_applies(torch.device("cuda"), None, AT_KD) == (True, "")
    assert graph_capture_applies(torch.device("cuda"), False, AT_KD) == (False, "turned off (--no-cuda-graphs)")


def test_the_default_fallback_on_a_graph_device_is_a_note_and_the_step_says_why(monkeypatch):
    fake_cuda.install(monkeypatch)
    teacher, student, _, opt = _toy()
    runtime = make_runtime(student, teacher, Objective("at", gradient=True), opt, CPU, None, speed=Speed())
    assert runtime.notes == ["CUDA graphs off (gradient attention's double backward cannot be captured); the eager step runs"]
    assert runtime.step.status == GraphStatus("off", why="gradient attention's double backward cannot be captured")
    runtime.close()
    with pytest.raises(ConfigError, match="--cuda-graphs cannot be honoured here: gradient attention"):
        make_runtime(student, teacher, Objective("at", gradient=True), opt, CPU, None, speed=Speed(cuda_graphs=True))
