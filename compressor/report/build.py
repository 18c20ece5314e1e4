"""Trade-off reports: the measure step's typed entries for the teacher, each student and its INT8
copy, assembled into a ``Report`` whose ``to_dict()`` is report.json; report.md, the terminal
table and tradeoff.png are views of that JSON (``tables``, ``plots``). Nothing here measures:
``compressor.measure`` does, and this package imports no training, export or profiling code.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
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
    section, the teacher's and every student's entry, and the machine. ``to_dict()`` is report.json."""

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["teacher"] = self.teacher.to_dict()
        d["students"] = [s.to_dict() for s in self.students]
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
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise AtcError(f"{run_dir} holds no report.json; pass the --out folder of an atc compress run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AtcError(f"{path} is not valid JSON ({exc.msg}); re-run atc compress to rebuild it") from exc


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of the same teacher → one report with all their students."""
    base = dict(reports[0])
    names = {r["teacher"]["name"] for r in reports}
    if len(names) > 1:
        raise AtcError(f"the runs have different teachers ({', '.join(sorted(names))}); report them separately")
    base["students"] = [s for r in reports for s in r["students"]]
    return base
