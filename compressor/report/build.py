"""Trade-off reports: report.json (the data), report.md and the terminal table (views of it),
and tradeoff.png (top-1 against measured speed-up and against GMACs, Pareto front marked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from compressor import fileio
from compressor.errors import AtcError
from compressor.report.plots import plot_tradeoff
from compressor.report.tables import markdown



REPORT_VERSION = 1



def write_report(out_dir: str | Path, report: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    fileio.write_json(out_dir / "report.json", report)
    fileio.write_text(out_dir / "report.md", markdown(report))
    plot_tradeoff(report, out_dir / "tradeoff.png")



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
