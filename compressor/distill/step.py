"""One training step that never waits for the host, and the same step captured as a CUDA graph.

``EagerStep`` runs teacher forward, student forward and backward, the loss terms and the optimizer
update, and adds the step's loss terms, correct predictions and non-finite checks to a ``Meter``
that lives on the device: no ``.item()``, ``float(t)`` or ``int(t)`` per step, so the host can
queue step after step. ``Meter.read`` copies the totals to the host (one synchronisation) every
``log_every`` steps and at the end of an epoch; it raises ``Diverged`` naming the first step at
which a term went non-finite.

``GraphedStep`` records the whole step (teacher forward, student forward and backward, loss, the
fused SGD update and the meter's update) as a CUDA graph on static input buffers and replays it
for every batch of that shape: one launch instead of hundreds. It captures **once per batch
shape** for the whole run. The learning rate and β are 0-d device tensors that the graph reads:
``make_optimizer`` gives each parameter group a tensor ``lr`` (the fused SGD kernel reads it on the
device; ``MultiStepLR`` writes a milestone into it with ``fill_``) and the step owns a β tensor that
``set_beta`` fills, so milestones and β decay change values, never the graph. A graph is never
dropped during a run: capturing again into the pool of a dropped graph can hit the caching
allocator's ``use_count > 0`` assert, because memory first allocated inside a capture (cuBLAS's
workspace) outlives the graph. A batch of a new shape therefore gets its own warm-up and a fresh
capture into a fresh pool; a batch that only has fewer samples than the first shape (the last,
partial batch of an epoch) takes the eager step.

Warm-up (``warmup`` real eager steps: they create the momentum buffers and let cuDNN pick its
kernels) and capture run on one stream the step owns; the caller's current stream is restored
after, and later replays run on the caller's stream.

The first replay after a capture checks itself: the eager step runs on that batch first, from the
same weights, optimizer state, BN buffers, meter and RNG state; the state is put back, the graph
is captured and replayed, and the graph's loss terms and updates (weights, momentum, BN buffers)
are compared with the eager step's (``CHECK_RTOL``, a few bf16 steps). Either way the run goes on
from the eager step's result, so the check leaves the run exactly where an eager run would be; on
a mismatch (or a failed capture) the step falls back to eager for the rest of the run and says so.

``status`` says what ran (``GraphStatus``: captured with the count, off with why, failed with the
first line of the error). Whether capture applies is decided apart, by ``graph_capture_applies``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import nn

from compressor.device import autocast
from compressor.distill.failures import diverged
from compressor.distill.losses import Objective, distillation_terms, input_gradient
from compressor.errors import ConfigError

# Device types a step can be captured on. Tests on the CPU add "cpu" together with a fake of
# torch.cuda's graph API (tests/fake_cuda.py); nothing else changes it.
GRAPH_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def graph_device(device: torch.device) -> bool:
    """Whether a step on ``device`` can be captured as a CUDA graph at all."""
    return device.type in GRAPH_DEVICE_TYPES

# The self-check's tolerance, relative: 2**-5 is eight bf16 steps (bf16 keeps 8 significant bits).
# The graph runs the eager step's kernels on the same inputs, so a correct graph agrees far more
# closely; a graph that read a stale rate, β or input buffer misses by the size of the change.
CHECK_RTOL = 2.0 ** -5


@dataclass
class EpochStats:
    """An epoch's training totals on the host (plain numbers, saved with the training state)."""

    sums: dict[str, float] = field(default_factory=dict)
    correct: int = 0
    seen: int = 0
    steps: int = 0
    seconds: float = 0.0

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(self.seen, 1) for k, v in self.sums.items()}


class Meter:
    """An epoch's running totals on the device: Σ term·batch per loss term (float64, added in step
    order as the host would, so a resumed epoch sums exactly like an uninterrupted one), correct
    predictions, and per term the first step (0-based) and value at which it was not finite."""

    def __init__(self, device: torch.device):
        self.device, self.names = device, []
        self.sums = self.correct = self.first_bad = self.bad_value = self.step = None
        self.read_step = 0  # the first step since the last read, for messages when no step is known

    def start(self, stats: EpochStats, start_step: int, names: list[str] | None = None) -> None:
        """Load the epoch's totals so far (in place: a captured graph keeps pointing at the tensors)."""
        self.read_step = start_step
        self._stats = stats
        if names is not None:
            self._allocate(names)
        if self.sums is not None:
            self._load(stats, start_step)

    def _allocate(self, names: list[str]) -> None:
        k, d = len(names), self.device
        self.names = list(names)
        self.sums = torch.zeros(k, dtype=torch.float64, device=d)
        self.correct = torch.zeros((), dtype=torch.int64, device=d)
        self.first_bad = torch.full((k,), -1, dtype=torch.int64, device=d)
        self.bad_value = torch.zeros(k, dtype=torch.float32, device=d)
        self.step = torch.zeros((), dtype=torch.int64, device=d)

    def _load(self, stats: EpochStats, start_step: int) -> None:
        # fill_ with host numbers: a kernel argument each, where a host tensor copied in would be a blocking copy
        for i, n in enumerate(self.names):
            self.sums[i].fill_(stats.sums.get(n, 0.0))
        self.correct.fill_(stats.correct)
        self.first_bad.fill_(-1)
        self.bad_value.zero_()
        self.step.fill_(start_step)

    def update(self, terms: dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor) -> None:
        """Device-only work: a handful of small kernels, no synchronisation."""
        if self.sums is None or list(terms) != self.names:  # first step of a run: the objective's terms are known now
            self._allocate(list(terms))
            self._load(self._stats, self.read_step)
        vals = torch.stack([t.detach().float() for t in terms.values()])
        self.sums.add_(vals.double() * y.shape[0])
        self.correct.add_((logits.detach().argmax(1) == y).sum())
        newly = ~torch.isfinite(vals) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(newly, self.step, self.first_bad))
        self.bad_value.copy_(torch.where(newly, vals, self.bad_value))
        self.step.add_(1)

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors a step updates (empty before the first step)."""
        return [] if self.sums is None else [self.sums, self.correct, self.first_bad, self.bad_value, self.step]

    def read(self, stats: EpochStats, epoch: int, last_step: int) -> None:
        """Copy the totals into ``stats`` (one synchronisation); raise ``Diverged`` if a term went non-finite.
        ``last_step`` is the last step run (0-based)."""
        if self.sums is not None:
            host = torch.cat([self.sums, self.correct.double().view(1), self.first_bad.double(), self.bad_value.double()]).tolist()
            k = len(self.names)
            sums, correct, first, values = host[:k], host[k], host[k + 1:2 * k + 1], host[2 * k + 1:]
            bad = [(int(f), self.names[i] == "loss", i) for i, f in enumerate(first) if f >= 0]
            if bad:  # the earliest step; at that step a named term before the total, as the message is more useful
                step, _, i = min(bad)
                raise diverged(self.names[i], values[i], epoch, step, step)
            stats.sums = dict(zip(self.names, sums))
            stats.correct = int(correct)
        self.read_step = last_step + 1


class EagerStep:
    """One training step, eager and sync-free. ``student`` and ``teacher`` return ``(logits, stage
    outputs)`` (``compressor.pair.StageOutputs``); ``plain_student``/``plain_teacher`` are the modules
    themselves, for gradient-based AT's input gradients. ``why_off``: why no graph was captured, for
    ``status``."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer, objective: Objective,
                 device: torch.device, amp: bool | torch.dtype | None, scaler: torch.amp.GradScaler | None = None,
                 plain_student: nn.Module | None = None, plain_teacher: nn.Module | None = None, why_off: str = "",
                 regressor: nn.Module | None = None):
        self.student, self.teacher, self.optimizer, self.objective = student, teacher, optimizer, objective
        self.device, self.amp, self.scaler = device, amp, scaler
        self.plain_student, self.plain_teacher = plain_student, plain_teacher
        self.grad_at = plain_teacher is not None and objective.uses_at and objective.gradient
        self.regressor = regressor  # FitNet: maps the student's hint stage output onto the teacher's
        if objective.uses_fitnet and teacher is not None and regressor is None:
            raise ValueError("a FitNet step needs the hint regressor (compressor.distill.hints.HintRegressor)")
        self.meter = Meter(device)
        self.beta: torch.Tensor | None = None  # β on the device (AT objectives), made by the first set_beta
        self._beta_value: float | None = None
        self.dkd_scale: torch.Tensor | None = None  # DKD's warm-up factor on the device, made by the first set_dkd_scale
        self.why_off = why_off

    @property
    def status(self) -> GraphStatus:
        return GraphStatus("off", why=self.why_off)

    def set_beta(self, beta: float | None) -> None:
        """Put this step's β (None: the objective's) into the device tensor the step reads, in place."""
        if not self.objective.uses_at:
            return
        value = float(self.objective.beta if beta is None else beta)
        if self.beta is None:
            self.beta = torch.full((), value, dtype=torch.float32, device=self.device)  # a fill, not a host copy
        elif value != self._beta_value:
            self.beta.fill_(value)
        self._beta_value = value

    def set_dkd_scale(self, value: float) -> None:
        """DKD's warm-up factor for the coming steps, filled into the device scalar the step reads (in place,
        as β: a captured graph keeps reading the same tensor)."""
        if self.dkd_scale is None:
            self.dkd_scale = torch.full((), float(value), dtype=torch.float32, device=self.device)  # a fill, not a host copy
        else:
            self.dkd_scale.fill_(float(value))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, beta: float | None = None) -> dict[str, torch.Tensor]:
        self.set_beta(beta)
        return self.run(x, y)

    def run(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step at the current β; returns the loss terms (device tensors)."""
        grads, t_logits, t_maps = None, None, []
        with autocast(self.device, self.amp, cache=False):
            if self.grad_at:  # J = dL/dx: a plain gradient for the teacher, double backprop for the student
                x = x.detach().requires_grad_(True)
                jt, t_logits = input_gradient(self.plain_teacher, x, y)
                js, logits = input_gradient(self.plain_student, x, y, create_graph=True)
                grads, t_logits, s_maps = (js, jt.detach()), t_logits.detach(), []
            else:
                if self.teacher is not None and self.objective.needs_teacher:
                    with torch.inference_mode():  # frozen: no autograd records, no version counters
                        t_logits, t_maps = self.teacher(x)
                logits, s_maps = self.student(x)
            hint = None
            if self.objective.uses_fitnet and t_maps:  # the one stage output is the hint's, not an AT pair's
                hint, s_maps, t_maps = (self.regressor(s_maps[0]), t_maps[0]), [], []
        terms = distillation_terms(self.objective, logits, y, t_logits, list(zip(s_maps, t_maps)), self.beta, grads, hint,
                                   self.dkd_scale)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            terms["loss"].backward()
            self.optimizer.step()
        else:  # fp16: scaled loss; a step whose gradients overflowed is skipped and the scale lowered
            self.scaler.scale(terms["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.meter.update(terms, logits, y)
        return terms

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor a step changes, by kind: the trained parameters, the optimizer's per-parameter
        state, the student's buffers (BN statistics) and the meter. (Gradients are not state: each step
        starts from none.)"""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt_state = [t for p in params for t in self.optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
        module = self.plain_student if self.plain_student is not None else self.student
        buffers = list(module.buffers()) if isinstance(module, nn.Module) else []
        buffers += list(self.regressor.buffers()) if self.regressor is not None else []  # FitNet's BN statistics
        return {"parameters": params, "optimizer state": opt_state, "buffers": buffers, "meter": self.meter.tensors()}


@dataclass(frozen=True)
class GraphStatus:
    """What the training step ran as. ``captured``: a CUDA graph, recorded ``captures`` times (once per
    batch shape) and replayed ``replays`` times; ``off``: the eager step, ``why`` says why; ``failed``:
    capture or the self-check failed, the eager step ran from then on, ``why`` holds the first line."""

    state: Literal["captured", "off", "failed"]
    captures: int = 0
    replays: int = 0
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one log line."""
        if self.state == "captured":
            return (f"CUDA graphs: the training step ran as a CUDA graph ({self.captures} capture{'s' * (self.captures != 1)}, "
                    f"{self.replays} replays)")
        if self.state == "failed":
            return f"CUDA graphs failed: {self.why}; the eager step ran instead"
        return f"CUDA graphs off ({self.why or 'not used'}); the eager step ran"


def graph_capture_applies(device: torch.device, requested: bool | None, objective: Objective, scaler: Any = None,
                          world_size: int = 1, device_resident: bool = True, compiled: bool = False) -> tuple[bool, str]:
    """Whether the step is captured as a CUDA graph, and if not, why. ``requested``: True (``--cuda-graphs``)
    raises ``ConfigError`` where graphs cannot be used; None (the default) falls back to the eager step."""
    if requested is False:
        return False, "turned off (--no-cuda-graphs)"
    why = None
    if not graph_device(device):
        why = f"training on {device.type}, not on a CUDA device"
    elif objective.uses_at and objective.gradient:
        why = "gradient attention's double backward cannot be captured"
    elif scaler is not None:
        why = "fp16 loss scaling decides skipped steps on the host"
    elif world_size > 1:
        why = f"data-parallel training over {world_size} processes"
    elif not device_resident:
        why = "streamed data (a DataLoader feeds the batches)"
    elif compiled:
        why = "--compile (torch.compile manages its own kernels)"
    if why is None:
        return True, ""
    if requested:
        raise ConfigError(f"--cuda-graphs cannot be honoured here: {why}; drop --cuda-graphs to train with the eager step")
    return False, why


@dataclass
class _Recording:
    """One captured graph and the static tensors it reads and writes."""

    graph: Any
    pool: Any
    x: torch.Tensor
    y: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class GraphedStep:
    """``EagerStep`` recorded as a CUDA graph once per batch shape and replayed (see the module docstring)."""

    def __init__(self, eager: EagerStep, warmup: int = 3, rtol: float = CHECK_RTOL):
        self.eager, self.warmup, self.rtol = eager, max(1, warmup), rtol  # capture needs the momentum buffers made
        self.graphs: dict[tuple, _Recording] = {}  # by batch shape; kept for the whole run
        self.warmed: dict[tuple, int] = {}
        self.stream = None  # the stream warm-up and capture run on, made at the first step
        self.captures = self.replays = 0
        self.failed: str | None = None

    @property
    def meter(self) -> Meter:
        return self.eager.meter

    @property
    def status(self) -> GraphStatus:
        if self.failed is not None:
            return GraphStatus("failed", self.captures, self.replays, self.failed)
        if self.graphs:
            return GraphStatus("captured", self.captures, self.replays)
        return GraphStatus("off", why=f"no batch to capture after the {self.warmup} eager warm-up steps")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, beta: float | None = None) -> dict[str, torch.Tensor]:
        self.eager.set_beta(beta)  # outside any graph: the graph reads the tensor
        if self.failed is not None:
            return self.eager.run(x, y)
        key = _shape_key(x, y)
        rec = self.graphs.get(key)
        if rec is not None:
            rec.x.copy_(x, non_blocking=True)
            rec.y.copy_(y, non_blocking=True)
            rec.graph.replay()
            self.replays += 1
            return rec.terms
        if self._is_partial(key):
            return self.eager.run(x, y)
        if self.warmed.get(key, 0) < self.warmup:
            return self._warm(key, x, y)
        return self._capture_checked(key, x, y)

    def _is_partial(self, key: tuple) -> bool:
        """A batch like one already seen but with fewer samples: the last one of an epoch."""
        return any(key[0][1:] == k[0][1:] and key[0][0] < k[0][0] and (key[2], key[4]) == (k[2], k[4]) for k in self.warmed)

    @contextlib.contextmanager
    def _own_stream(self, device: torch.device) -> Iterator[None]:
        """Run the block on the step's stream, ordered after the caller's work and before what follows it."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        caller = torch.cuda.current_stream(device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):  # restores the caller's current stream on exit, also after an error
            yield
        caller.wait_stream(self.stream)

    def _warm(self, key: tuple, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """A real step on the step's stream, as capture will run (lazy initialisation happens here, not in the graph)."""
        with self._own_stream(x.device):
            terms = self.eager.run(x, y)
        self.warmed[key] = self.warmed.get(key, 0) + 1
        return terms

    def _capture_checked(self, key: tuple, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The eager step on this batch, then the graph captured and replayed from the same state and
        compared with it; the run continues from the eager step's result."""
        state = _StepState(self.eager)
        with self._own_stream(x.device):
            before = state.snapshot()
            eager_terms = {k: v.detach().clone() for k, v in self.eager.run(x, y).items()}
            after = state.snapshot()
            try:
                state.restore(before)
                rec = self._record(x, y)
                state.restore(before)  # the RNG as the eager step found it (capture may draw offsets)
                rec.graph.replay()
                self.captures, self.replays = self.captures + 1, self.replays + 1
                why = _disagreement(eager_terms, rec.terms, before, after, state.snapshot(), self.rtol)
            except Exception as exc:  # e.g. a model that synchronises inside its forward
                rec, why = None, f"capture failed ({_first_line(exc)})"
            state.restore(after)
        if why:
            self.failed = why
            self.eager.optimizer.zero_grad(set_to_none=True)  # eager steps allocate their own gradients again
            return eager_terms
        self.graphs[key] = rec
        return eager_terms

    def _record(self, x: torch.Tensor, y: torch.Tensor) -> _Recording:
        """Capture the step into a fresh pool on the step's stream (graph capture records without running)."""
        rec = _Recording(torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle(), x.clone(), y.clone())  # clone keeps the memory format
        self.eager.optimizer.zero_grad(set_to_none=True)  # gradients come from the graph's memory from now on
        with torch.cuda.graph(rec.graph, pool=rec.pool, stream=self.stream):
            rec.terms = self.eager.run(rec.x, rec.y)
        return rec


def _shape_key(x: torch.Tensor, y: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


class _StepState:
    """Copies of everything a step changes, and the RNG, to put back."""

    def __init__(self, step: EagerStep):
        self.tensors = step.state_tensors()
        self.device = step.device

    def snapshot(self) -> dict[str, Any]:
        with torch.no_grad():
            saved: dict[str, Any] = {k: [t.detach().clone() for t in ts] for k, ts in self.tensors.items()}
        saved["rng"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()
        return saved

    def restore(self, saved: dict[str, Any]) -> None:
        with torch.no_grad():
            for kind, ts in self.tensors.items():
                for t, s in zip(ts, saved[kind]):
                    t.copy_(s)
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"], self.device)
        else:
            torch.set_rng_state(saved["rng"])


def _disagreement(eager_terms: dict[str, torch.Tensor], graph_terms: dict[str, torch.Tensor], before: dict[str, Any],
                  eager_after: dict[str, Any], graph_after: dict[str, Any], rtol: float) -> str:
    """Empty when the graphed step did what the eager step did, otherwise what differed. Updates are
    compared per kind of state as ``|graph - eager| <= rtol * |eager - before|`` (norms over the kind),
    counts exactly. A step whose terms are not finite is not compared: the meter stops that run."""
    if not all(bool(torch.isfinite(e).all()) for e in eager_terms.values()):
        return ""
    for name, e in eager_terms.items():
        g = graph_terms.get(name)
        if g is None or not bool(torch.isclose(g.detach().float(), e.float(), rtol=rtol, atol=rtol * 1e-3).all()):
            shown = "missing" if g is None else f"{float(g.detach().float()):.6g}"
            return f"self-check failed: the graphed step's {name} term is {shown}, the eager step's {float(e.detach().float()):.6g}"
    for kind in ("parameters", "optimizer state", "buffers", "meter"):
        change = miss = 0.0
        for b, e, g in zip(before[kind], eager_after[kind], graph_after[kind]):
            if not b.is_floating_point():
                if not torch.equal(e, g):
                    return f"self-check failed: the graphed step's {kind} counts differ from the eager step's"
                continue
            change += float((e.double() - b.double()).pow(2).sum())
            miss += float((g.double() - e.double()).pow(2).sum())
        if miss ** 0.5 > rtol * change ** 0.5:
            return (f"self-check failed: the graphed step changed the {kind} differently from the eager step "
                    f"(by {miss ** 0.5 / max(change ** 0.5, 1e-30):.1%} of the eager change)")
    return ""


def make_step(eager: EagerStep, graphs: bool, warmup: int = 3) -> EagerStep | GraphedStep:
    return GraphedStep(eager, warmup) if graphs else eager
