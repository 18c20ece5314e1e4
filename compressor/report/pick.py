"""Which student a run publishes (the top-level ``student.pt``/``student.onnx``): a stated rule over
measured figures, never list order alone.

Rules (``--pick``):

- ``auto`` (default): the first student (the one named first, or the preset's choice) unless another
  student is at least as accurate *and* at least as fast (measured latency speed-up), better in one;
  then the most accurate of those that beat it. A run never publishes a student that another of
  its students beats on both axes.
- ``accurate``: the highest top-1 (ties: the faster).
- ``fastest``: the highest measured speed-up (ties: the more accurate).
- a number ``X`` (``3`` or ``3x``): the most accurate student at least ``X`` times faster than the
  teacher; when none is, the fastest, and the reason says so.

A student is a mapping with ``name``, ``top1`` and ``latency_speedup`` (report.json's student entries);
a missing figure counts as 0. Plain data in, a ``Pick`` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from compressor.errors import ConfigError

RULES = ("auto", "accurate", "fastest")


@dataclass(frozen=True)
class Pick:
    index: int   # into the students given
    name: str
    rule: str    # as given: auto, accurate, fastest or a speed-up such as 3x
    reason: str  # one sentence for report.md and the log


def parse_pick(text: str | None) -> str:
    """``auto``, ``accurate``, ``fastest`` or a speed-up (``3``, ``2.5x``), normalised; anything else is refused."""
    rule = (text or "auto").strip().lower()
    if rule in RULES:
        return rule
    try:
        value = float(rule.removesuffix("x").removesuffix("×"))
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"--pick {text!r} is not a rule; use auto, accurate, fastest or a speed-up such as 3x")
    return f"{value:g}x"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (higher x, higher y)."""
    return [i for i, p in enumerate(points) if not any(_dominates(q, p) for j, q in enumerate(points) if j != i)]


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def _figures(s: Mapping[str, Any]) -> tuple[float, float]:
    """(speed-up, top-1), 0 where a figure is missing."""
    return float(s.get("latency_speedup") or 0.0), float(s.get("top1") or 0.0)


def _describe(s: Mapping[str, Any]) -> str:
    speed, top1 = _figures(s)
    return f"{s['name']} ({top1:.2f}%, {speed:.2f}x)"


def pick_student(students: Sequence[Mapping[str, Any]], rule: str = "auto") -> Pick:
    """The student to publish under ``rule`` (see the module docstring), with the reason in one sentence."""
    if not students:
        raise ConfigError("there is no student to pick from")
    rule = parse_pick(rule)
    figs = [_figures(s) for s in students]
    by_accuracy = sorted(range(len(students)), key=lambda i: (figs[i][1], figs[i][0]), reverse=True)
    by_speed = sorted(range(len(students)), key=lambda i: figs[i], reverse=True)
    if len(students) == 1:
        return Pick(0, students[0]["name"], rule, f"{_describe(students[0])} is the only student")
    if rule == "accurate":
        i = by_accuracy[0]
        return Pick(i, students[i]["name"], rule, f"{_describe(students[i])} is the most accurate student (--pick accurate)")
    if rule == "fastest":
        i = by_speed[0]
        return Pick(i, students[i]["name"], rule, f"{_describe(students[i])} has the highest measured speed-up (--pick fastest)")
    if rule != "auto":
        target = float(rule[:-1])
        fast_enough = [i for i in by_accuracy if figs[i][0] >= target]
        if fast_enough:
            i = fast_enough[0]
            return Pick(i, students[i]["name"], rule, f"{_describe(students[i])} is the most accurate student at least "
                                                      f"{target:g}x faster than the teacher (--pick {rule})")
        i = by_speed[0]
        return Pick(i, students[i]["name"], rule, f"no student reached {target:g}x; {_describe(students[i])} is the fastest "
                                                  f"(--pick {rule})")
    better = [i for i in by_accuracy if i != 0 and _dominates(figs[i], figs[0])]
    if not better:
        return Pick(0, students[0]["name"], rule, f"{_describe(students[0])} is the first choice and no other student is both "
                                                  "more accurate and faster (--pick auto)")
    i = better[0]
    return Pick(i, students[i]["name"], rule, f"{_describe(students[i])} replaces the first choice {_describe(students[0])}: "
                                              "it is at least as accurate and as fast, better in one (--pick auto)")
