"""Trade-off reports: the measure step's typed entries for the teacher, each student and its INT8
copy, assembled into a ``Report`` whose ``to_dict()`` is report.json; report.md, the terminal
table and tradeoff.png are views of that JSON (``tables``, ``plots``). Nothing here measures:
``compressor.measure`` does, and this package imports no training, export or profiling code.
"""

from __future__ import annotations

import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from compressor import __version__, fileio
from compressor.config import Config
from compressor.data.open import Dataset
from compressor.entries import Measurements, StudentEntry, TeacherEntry
from compressor.errors import AtcError
from compressor.report.plots import plot_tradeoff
from compressor.report.tables import markdown
from compressor.units import REPORT_UNITS

REPORT_VERSION = 1


@dataclass
class Report:
    """A compress run's result: what ran (command, preset, method, epochs, config, data), the latency
    section, the teacher's and every student's entry, the machine, and which student was published
    (``published``: set by the pipeline after ``compressor.report.pick``). ``to_dict()`` is report.json."""

    command: str
    preset: str
    method: str
    epochs: int
    config: dict[str, Any]
    data: dict[str, Any]
    latency: dict[str, Any]
    teacher: TeacherEntry
    students: list[StudentEntry]
    environment: dict[str, Any] = field(default_factory=dict)
    atc_version: str = __version__
    report_version: int = REPORT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    units: dict[str, str] = field(default_factory=lambda: dict(REPORT_UNITS))
    published: dict[str, Any] | None = None  # name, rule, reason, checkpoint of the student at the top of the output folder

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["teacher"] = self.teacher.to_dict()
        d["students"] = [s.to_dict() for s in self.students]
        if d["published"] is None:
            del d["published"]
        return d


def describe_data(data: Dataset) -> dict[str, Any]:
    """The report's data section: name, sizes, classes and what was done to the source images."""
    return {"name": data.name, "train": len(data.train_y), "test": len(data.test_y), "classes": data.num_classes,
            "input_size": list(data.input_size), "source_channels": list(data.source_channels),
            "resized_from": list(data.resized_from) if data.resized_from else None, "notes": list(data.notes)}


def build_report(measured: Measurements, cfg: Config, method: str, data: Dataset, command: str = "") -> Report:
    """The report of a compress run from what the measure step found."""
    return Report(command=command, preset=cfg.preset, method=method, epochs=cfg.train.epochs, config=cfg.to_dict(),
                  data=describe_data(data), latency=measured.latency, teacher=measured.teacher, students=measured.students,
                  environment=measured.environment)


def write_report(out_dir: str | Path, report: Report | dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    data = report.to_dict() if isinstance(report, Report) else report
    fileio.write_json(out_dir / "report.json", data)
    fileio.write_text(out_dir / "report.md", markdown(data))
    plot_tradeoff(data, out_dir / "tradeoff.png")


def read_report(run_dir: str | Path) -> dict[str, Any]:
    """A run's report.json; files of earlier atc versions are read with today's key names."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise AtcError(f"{run_dir} holds no report.json; pass the --out folder of an atc compress run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AtcError(f"{path} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)}); re-run atc compress to rebuild it") from None
    if isinstance(data, dict):
        data = upgrade_report(data)  # old key names first: the check is against today's fields
    check_report(data, path)
    return data


def check_report(data: Any, path: str | Path) -> None:
    """report.json read back, field by field against the dataclasses that wrote it (``Report``,
    ``TeacherEntry``, ``StudentEntry``): a missing or mistyped field is named with the file."""
    _check_fields(data, Report, path, "", skip=("teacher", "students"))
    _check_fields(data["teacher"], TeacherEntry, path, "teacher.")
    if not isinstance(data["students"], list) or not data["students"]:
        raise AtcError(f"{path}: field 'students' must be a non-empty list; re-run atc compress to rebuild it")
    for i, student in enumerate(data["students"]):
        _check_fields(student, StudentEntry, path, f"students[{i}].")


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "list": (list,), "dict": (dict,)}


def _check_fields(d: Any, cls: type, path: str | Path, prefix: str, skip: tuple[str, ...] = ()) -> None:
    if not isinstance(d, dict):
        what = prefix.rstrip(".") or "the report"
        raise AtcError(f"{path}: {what} must be a JSON object, got {type(d).__name__}; re-run atc compress to rebuild it")
    for f in fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        if f.name not in d:
            if required:
                raise AtcError(f"{path}: field '{prefix}{f.name}' is missing; re-run atc compress to rebuild it")
            continue
        if f.name in skip:
            continue
        kind = str(f.type).split("[")[0].split(" ")[0]
        value = d[f.name]
        if value is None:
            ok = "None" in str(f.type)
        else:
            ok = kind not in _KINDS or (isinstance(value, _KINDS[kind]) and not isinstance(value, bool))
        if not ok:
            raise AtcError(f"{path}: field '{prefix}{f.name}' must be {kind}, got {type(value).__name__}; "
                           "re-run atc compress to rebuild it")


# report.json keys renamed since report_version 1 first shipped: old name → new name (latency section)
RENAMED_LATENCY_KEYS = {"teacher_median_ms": "teacher_solo_median_ms", "teacher_cv": "teacher_solo_cv"}


def upgrade_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with old key names replaced by today's (the values stay as they were measured)."""
    lat = report.get("latency")
    if isinstance(lat, dict):
        for old, new in RENAMED_LATENCY_KEYS.items():
            if old in lat and new not in lat:
                lat[new] = lat.pop(old)
    return report


def _run_identity(r: dict[str, Any]) -> tuple[tuple, tuple]:
    """What must match for runs to share one table: the data (name, sizes, classes, input) and the teacher."""
    d, t = r.get("data", {}), r.get("teacher", {})
    return ((d.get("name"), d.get("train"), d.get("test"), d.get("classes"), tuple(d.get("input_size") or ())),
            (t.get("name"), t.get("params"), t.get("gmacs")))


def merge_reports(reports: list[dict[str, Any]], labels: list[str] | None = None) -> dict[str, Any]:
    """Several runs of the same teacher on the same data → one report with all their students; runs of
    other data or another teacher are refused (their deltas and speed-ups would be against a teacher
    not in the table). Each student keeps the thread count its latency was timed with
    (``latency_threads``); a merged report publishes no student of its own. ``labels`` name the runs
    in messages (their folders)."""
    if len(reports) == 1:
        return reports[0]
    labels = labels or [f"run {i + 1}" for i in range(len(reports))]
    first_data, first_teacher = _run_identity(reports[0])
    for label, r in zip(labels[1:], reports[1:]):
        data, teacher = _run_identity(r)
        if data != first_data:
            raise AtcError(f"{labels[0]} and {label} were run on different data ({_describe_data(first_data)} vs "
                           f"{_describe_data(data)}); report them separately")
        if teacher != first_teacher:
            raise AtcError(f"{labels[0]} and {label} have different teachers ({first_teacher[0]}, {first_teacher[1]:,} params vs "
                           f"{teacher[0]}, {teacher[1]:,} params); report them separately")
    base = dict(reports[0])
    base.pop("published", None)
    base["students"] = [{**s, "latency_threads": s.get("latency_threads", r.get("latency", {}).get("threads"))}
                        for r in reports for s in r["students"]]
    return base


def _describe_data(identity: tuple) -> str:
    name, train, test, classes, size = identity
    return f"{name}: {train} train / {test} test images, {classes} classes, input {'x'.join(map(str, size))}"
