"""Target search: find the width (and depth) of a thinned student that meets a speed-up target.

``--target-speedup 3 --by gmacs`` asks for a student with a third of the teacher's multiply-adds
(fvcore GMACs); ``--by params`` a third of its parameters; ``--by latency`` one that runs 3x
faster, measured the way ``atc profile`` does: both models exported to ONNX and timed with
onnxruntime (``--runtime ort-cpu``, ``--batch-size 1``), interleaved, the speed-up being the
median of per-round ratios.

Policy: thin first; remove blocks only when the width floor cannot reach the target. For each
depth (all blocks, then at most ceil(n/2) and then 1 block per stage) the width is searched by
secant steps on log(speed-up) against log(width), seeded from the GMACs ratio. Channel counts
move in steps of ``round_to``, so widths that give the same channels are measured once. Measured
latency need not fall as the width does (a thinner model can be slower), so nothing assumes it:
every candidate is measured and the one nearest the target is kept. The chosen one is then timed
again with more rounds, and that measurement is what the report states.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from compressor import fileio
from compressor.derive.thinning import ROUND_TO, Thinner
from compressor.errors import ConfigError
from compressor.events import SILENT, Reporter
from compressor.models.plan import SearchSummary, ThinningPlan
from compressor.profiling.counts import count_macs, count_params
from compressor.profiling.latency import RUNTIMES, SpeedUp, compare_latency

BY = ("gmacs", "params", "latency")

DEFAULT_TOLERANCE = {"gmacs": 0.05, "params": 0.05, "latency": 0.10}


@dataclass(frozen=True)
class Target:
    """What the student must achieve, as a speed-up over the teacher in one unit."""

    speedup: float
    by: str = "gmacs"
    runtime: str = "ort-cpu"
    batch_size: int = 1
    threads: int | None = None
    tolerance: float | None = None  # relative; None: 5% for gmacs/params, 10% for latency
    min_width: float = 0.25         # below this, blocks go before more channels do
    max_trials: int = 6             # measured candidates per depth (latency)
    rounds: int = 10                # interleaved latency rounds per candidate during the search
    final_rounds: int = 30          # ... and for the chosen one

    def __post_init__(self):
        if self.by not in BY:
            raise ConfigError(f"--by {self.by} is unknown; choose one of {', '.join(BY)}")
        if not self.speedup > 1:
            raise ConfigError(f"--target-speedup must be above 1 (e.g. 3), got {self.speedup:g}")
        if self.by == "latency" and self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime} is unknown; choose one of {', '.join(RUNTIMES)}")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if not 0 < self.min_width <= 1:
            raise ConfigError(f"the width floor must lie in (0, 1], got {self.min_width:g}")

    @property
    def tol(self) -> float:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.by]

    def describe(self) -> str:
        if self.by == "latency":
            return f"{self.speedup:g}x latency ({self.runtime}, batch {self.batch_size})"
        return f"{self.speedup:g}x fewer {'GMACs' if self.by == 'gmacs' else 'params'}"


def make_target(speedup: float | None, by: str | None = None, runtime: str = "ort-cpu", batch_size: int = 1,
                threads: int | None = None) -> Target | None:
    """The search goal of ``--target-speedup``/``--by``; None when no speed-up is asked for."""
    if speedup is None:
        if by is not None:
            raise ConfigError("--by says how --target-speedup is measured; add --target-speedup N (e.g. 3)")
        return None
    return Target(speedup, by or "gmacs", runtime, batch_size, threads)


@dataclass
class Trial:
    """One measured candidate."""

    width: float
    max_blocks: int | None
    params: int
    gmacs: float
    param_ratio: float
    mac_ratio: float
    latency_speedup: float | None = None
    latency_spread: tuple[float, float] | None = None
    signature: tuple[int, ...] = field(default=(), repr=False)

    def achieved(self, by: str) -> float:
        return {"gmacs": self.mac_ratio, "params": self.param_ratio, "latency": self.latency_speedup or 0.0}[by]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("signature")
        d["latency_spread"] = list(self.latency_spread) if self.latency_spread else None
        return d


@dataclass
class SearchResult:
    target: Target
    best: Trial
    student: nn.Module           # the chosen student, holding the teacher's surviving weights
    plan: ThinningPlan
    trials: list[Trial]
    teacher_params: int
    teacher_gmacs: float
    final: SpeedUp | None = None  # the chosen student's confirming latency measurement

    @property
    def achieved(self) -> float:
        return self.final.speedup if self.final is not None else self.best.achieved(self.target.by)

    @property
    def met(self) -> bool:
        return abs(self.achieved / self.target.speedup - 1) <= self.target.tol

    def summary(self) -> SearchSummary:
        """The search as the plan keeps it (and checkpoints and report.json show it)."""
        t, f = self.target, self.final
        latency = t.by == "latency"
        return SearchSummary(t.speedup, t.by, self.achieved, self.met, t.tol, self.best.width, self.best.max_blocks,
                             [x.to_dict() for x in self.trials], self.best.mac_ratio, self.best.param_ratio,
                             runtime=t.runtime if latency else None, batch_size=t.batch_size if latency else None,
                             threads=(f.threads if f else t.threads) if latency else None,
                             spread=list(f.spread) if latency and f else None, rounds=f.rounds if latency and f else None,
                             teacher_ms=f.teacher_ms if latency and f else None, student_ms=f.student_ms if latency and f else None)

    def to_dict(self) -> dict[str, Any]:
        return self.summary().to_dict()


def depth_options(thinner_stages: list, blocks_per_stage: int | None = None) -> list[int | None]:
    """Block caps to try, deepest first: all blocks, then ceil(n/2), then 1 (n: the longest stage)."""
    if blocks_per_stage is not None:
        return [blocks_per_stage]
    longest = max((len(s.blocks) for s in thinner_stages), default=1)
    caps: list[int | None] = [None]
    for cap in (math.ceil(longest / 2), 1):
        if cap < longest and cap not in caps:
            caps.append(cap)
    return caps


class _Evaluator:
    """Measures candidates of one teacher, caching by channel configuration."""

    def __init__(self, teacher: nn.Module, input_size, target: Target, workdir: Path, reporter: Reporter):
        self.teacher, self.input_size, self.target, self.reporter = teacher, tuple(input_size), target, reporter
        self.t_params = count_params(teacher)["total"]
        self.t_gmacs = count_macs(teacher, self.input_size).gmacs
        self.workdir = workdir
        self.t_onnx: Path | None = None
        self.cache: dict[tuple, Trial] = {}
        self.trials: list[Trial] = []

    def teacher_onnx(self) -> Path:
        if self.t_onnx is None:
            from compressor.export.onnx import to_onnx

            self.t_onnx = to_onnx(self.teacher, self.input_size, self.workdir / "teacher.onnx")
        return self.t_onnx

    def latency(self, student: nn.Module, rounds: int) -> SpeedUp:
        from compressor.export.onnx import to_onnx

        t = self.target
        ort = t.runtime.startswith("ort")  # PyTorch runtimes time the modules themselves
        return compare_latency(self.teacher, student, self.input_size, t.runtime, t.batch_size, t.threads, rounds=rounds,
                               teacher_onnx=self.teacher_onnx() if ort else None,
                               student_onnx=to_onnx(student, self.input_size, self.workdir / "student.onnx") if ort else None)

    def __call__(self, thinner: Thinner, width: float, by: str) -> Trial:
        plan = thinner.plan(width)
        signature = (thinner.max_blocks,) + tuple(len(k) for d in plan.kept.values() for k in d.values())
        trial, student = self.cache.get(signature), None
        if trial is None:
            student, _ = thinner.student(width, describe=False)
            params = count_params(student)["total"]
            gmacs = count_macs(student, self.input_size).gmacs
            trial = Trial(width, thinner.max_blocks, params, gmacs, self.t_params / params, self.t_gmacs / gmacs, signature=signature)
            self.cache[signature] = trial
            self.trials.append(trial)
        elif by != "latency" or trial.latency_speedup is not None:
            return trial
        if by == "latency":
            student = student if student is not None else thinner.student(width, describe=False)[0]
            speed = self.latency(student, self.target.rounds)
            trial.latency_speedup, trial.latency_spread = speed.speedup, speed.spread
        blocks = "all blocks" if trial.max_blocks is None else f"<= {trial.max_blocks} block(s)/stage"
        extra = f", latency {trial.latency_speedup:.2f}x" if trial.latency_speedup is not None else ""
        self.reporter.info(f"  width {trial.width:.3f}, {blocks}: {trial.mac_ratio:.2f}x fewer GMACs, "
                           f"{trial.param_ratio:.2f}x fewer params{extra}")
        return trial


def _closeness(by: str, goal: float) -> Callable[[Trial], float]:
    """Distance of a trial from the goal, in log speed-up (so 2x too slow and 2x too fast weigh the same)."""
    return lambda t: abs(math.log(max(t.achieved(by), 1e-9) / goal))


def _secant(points: list[tuple[float, float]], goal: float, fallback_slope: float) -> float:
    """Next log-width from (log width, log speed-up) points, aiming at log speed-up ``goal``."""
    (x1, y1) = points[-1]
    slope = -fallback_slope
    if len(points) >= 2:
        (x0, y0) = points[-2]
        if abs(x1 - x0) > 1e-9:
            s = (y1 - y0) / (x1 - x0)
            if -6.0 < s < -0.2:  # speed-up falls as width grows; anything else is noise
                slope = s
    return x1 + (goal - y1) / slope


def _search_width(evaluate: Callable[[float, str], Trial], by: str, goal: float, tol: float, min_width: float,
                  max_trials: int, start: float, slope: float) -> list[Trial]:
    """Secant search on width in [min_width, 1] for one depth; returns the trials made."""
    log_goal = math.log(goal)
    made: list[Trial] = []
    points: list[tuple[float, float]] = []
    lo, hi = math.log(min_width), 0.0
    x = min(hi, max(lo, math.log(start)))
    for _ in range(max_trials):
        trial = evaluate(math.exp(x), by)
        if trial in made:  # same channels as before: nudge by one step
            x = x + (0.05 if trial.achieved(by) > goal else -0.05)
            x = min(hi, max(lo, x))
            trial = evaluate(math.exp(x), by)
            if trial in made:
                break
        made.append(trial)
        y = math.log(max(trial.achieved(by), 1e-9))
        if abs(y - log_goal) <= math.log1p(tol) / 2:
            break
        if y < log_goal:  # not fast enough: thinner
            hi = min(hi, x)
        else:
            lo = max(lo, x)
        points.append((x, y))
        nxt = _secant(points, log_goal, slope)
        if not math.isfinite(nxt):
            break
        nxt = min(hi, max(lo, nxt))
        if abs(nxt - x) < 1e-4:
            if (x <= math.log(min_width) + 1e-6 and y < log_goal) or (x >= -1e-6 and y > log_goal):
                break  # the bound itself is the closest this depth gets
            nxt = (lo + hi) / 2
        x = nxt
    return made


def search(teacher: nn.Module, input_size: tuple[int, int, int], target: Target, *,
           teacher_arch: Mapping[str, Any] | None = None, blocks_per_stage: int | None = None,
           round_to: int = ROUND_TO, name: str | None = None, reporter: Reporter = SILENT) -> SearchResult:
    """Find the student of ``teacher`` that comes nearest ``target``; see the module docstring."""
    by, goal = target.by, target.speedup
    with fileio.scratch_dir() as tmp:
        evaluate = _Evaluator(teacher, input_size, target, tmp, reporter)
        first = Thinner(teacher, input_size, None, round_to=round_to, teacher_arch=teacher_arch)
        thinners: dict[int | None, Thinner] = {None: first}
        best: Trial | None = None
        closeness = _closeness(by, goal)
        for cap in depth_options(first.stages, blocks_per_stage):
            if cap not in thinners:
                thinners[cap] = Thinner(teacher, input_size, cap, round_to=round_to, teacher_arch=teacher_arch, check=False)
            thinner = thinners[cap]
            reporter.info(f"searching width for {target.describe()} with "
                          f"{'all blocks' if cap is None else f'at most {cap} block(s) per stage'}")
            # Seed from multiply-adds (cheap), then refine on the unit asked for.
            seed = _search_width(lambda w, b: evaluate(thinner, w, b), "gmacs", goal, DEFAULT_TOLERANCE["gmacs"],
                                 target.min_width, 8, math.sqrt(1 / goal), 2.0)
            start = min(seed, key=_closeness("gmacs", goal)).width
            made = seed if by == "gmacs" else _search_width(lambda w, b: evaluate(thinner, w, b), by, goal, target.tol,
                                                            target.min_width, target.max_trials if by == "latency" else 8,
                                                            start, 1.0 if by == "latency" else 2.0)
            made = [t for t in made if by != "latency" or t.latency_speedup is not None]
            depth_best = min(made, key=closeness) if made else None
            if depth_best is not None and (best is None or closeness(depth_best) < closeness(best)):
                best = depth_best
            if best is not None and closeness(best) <= math.log1p(target.tol):
                break
        assert best is not None
        thinner = thinners[best.max_blocks]
        student, plan = thinner.student(best.width, name)
        final = evaluate.latency(student, target.final_rounds) if by == "latency" else None
        result = SearchResult(target, best, student, plan, evaluate.trials, evaluate.t_params, evaluate.t_gmacs, final)
    plan.search = result.summary()
    return result
