"""A method axis in `atc sweep`: each cell trains its own method, and sweep.md gives each method's
paired difference from `none` over the same seeds."""

from __future__ import annotations

import json

import pytest

from compressor.report.tables import sweep_markdown
from compressor.studies.sweep import Cell, cell_config, paired_vs_none, parse_grid
from tests.helpers import make_image_folder


def _runs(*pairs):
    return [{"seed": s, "top1": t} for s, t in pairs]


def test_paired_difference_from_none_by_hand():
    none = Cell({"method": "none"}, _runs((0, 50.0), (1, 60.0), (2, 55.0)))
    at = Cell({"method": "at"}, _runs((0, 53.0), (1, 61.0), (2, 58.0)))  # differences 3, 1, 3
    cells = [none, at]
    got = paired_vs_none(at, cells)["vs_none"]
    assert got["n"] == 3 and got["mean"] == pytest.approx(7 / 3) and got["median"] == 3.0
    assert got["std"] == pytest.approx(((2 / 3) ** 2 * 2 + (4 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    assert paired_vs_none(none, cells) == {}  # the reference itself
    # pairs by seed, not by position: a seed missing on one side is left out
    partial = Cell({"method": "kd"}, _runs((2, 57.0), (0, 49.0), (7, 99.0)))
    assert paired_vs_none(partial, cells)["vs_none"]["mean"] == pytest.approx(((57 - 55) + (49 - 50)) / 2)
    # without a method axis, or without a none cell of the same other settings: nothing
    assert paired_vs_none(Cell({"beta": "0"}, _runs((0, 1.0))), cells) == {}
    other = Cell({"method": "at", "beta": "1e3"}, _runs((0, 1.0)))
    assert paired_vs_none(other, [other, Cell({"method": "none", "beta": "0"}, _runs((0, 2.0)))]) == {}


def test_sweep_markdown_shows_the_paired_column_and_says_what_it_is():
    result = {"teacher": {"name": "t", "top1": 90.0}, "student": "s", "method": "methods none, at", "preset": "demo",
              "epochs": 1, "seeds": [0, 1], "data": {"name": "d", "train": 10, "test": 5}, "grid": {"method": ["none", "at"]},
              "cells": [{"params": {"method": "none"}, "n": 2, "mean": 55.0, "std": 7.07, "median": 55.0, "runs": _runs((0, 50.0), (1, 60.0))},
                        {"params": {"method": "at"}, "n": 2, "mean": 57.0, "std": 5.66, "median": 57.0,
                         "vs_none": {"n": 2, "mean": 2.0, "std": 1.41, "median": 2.0}, "runs": _runs((0, 53.0), (1, 61.0))}]}
    md = sweep_markdown(result)
    assert "| method | n | top-1 mean ± std | Δ vs none (paired) mean ± std | median | per seed |" in md
    assert "| none | 2 | 55.00 ± 7.07 | (reference) |" in md and "| at | 2 | 57.00 ± 5.66 | +2.00 ± 1.41 |" in md
    assert "seed by seed" in md


def test_a_method_cell_trains_its_own_method_and_drops_attention_settings_without_at():
    cfg, slug = cell_config("demo", {}, Cell({"method": "fitnet", "attention": "gradient"}), "at+kd", 0)
    assert cfg.distill.method == "fitnet" and slug == "method=fitnet"  # no AT: the attention settings are dropped
    assert cfg.distill.attention == "sum-p"
    cfg, slug = cell_config("demo", {}, Cell({"method": "at+dkd", "beta": "1e3"}), "at+kd", 0)
    assert cfg.distill.method == "at+dkd" and cfg.distill.beta == 1000.0 and slug == "method=at+dkd_beta=1e3"
    cfg, _ = cell_config("demo", {}, Cell({"beta": "1e3"}), "kd+at", 0)
    assert cfg.distill.method == "at+kd"  # the sweep's --method, in its canonical spelling
    with pytest.raises(Exception, match="kd and dkd are both logit distillation"):
        parse_grid(["method=none,kd+dkd"])


@pytest.mark.slow
def test_method_sweep_end_to_end(tmp_path, tiny_teacher):
    from compressor.studies.sweep import run_sweep

    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, size=16)
    teacher = tiny_teacher("wrn-10-2", 3, 16, path=tmp_path / "t.pt")
    res = run_sweep(teacher, data, tmp_path / "sw", "demo", ["method=none,fitnet,at+dkd"],
                    overrides={"train": {"epochs": 1, "batch_size": 8}}, seeds=2, student="wrn-10-1")
    cells = {c["params"]["method"]: c for c in res["cells"]}
    for method, term in (("none", None), ("fitnet", "train_hint"), ("at+dkd", "train_nckd")):
        for run in cells[method]["runs"]:
            first = json.loads((tmp_path / "sw" / run["dir"] / "metrics.jsonl").read_text().splitlines()[0])
            assert (term in first) if term else set(first) >= {"train_ce"} and "train_kd" not in first
    base = {r["seed"]: r["top1"] for r in cells["none"]["runs"]}
    for method in ("fitnet", "at+dkd"):
        diffs = [r["top1"] - base[r["seed"]] for r in cells[method]["runs"]]
        assert cells[method]["vs_none"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert "Δ vs none (paired)" in (tmp_path / "sw" / "sweep.md").read_text()
