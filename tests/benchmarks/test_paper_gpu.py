"""benchmarks/paper_gpu.py: the aggregation by hand, the plan, and the script end to end on tiny data
(time budget → partial results, a second run that finishes, a third that launches nothing)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_image_folder


def _module():
    spec = importlib.util.spec_from_file_location("paper_gpu", ROOT / "benchmarks" / "paper_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["paper_gpu"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _report(top1: float, teacher_top1: float = 90.0, **student) -> dict:
    return {"teacher": {"top1": teacher_top1}, "students": [{"top1": top1, **student}]}


def test_paired_differences_and_mean_std_by_hand():
    pg = _module()
    top1 = {("none", 0): 80.0, ("none", 1): 82.0, ("none", 2): 78.0,
            ("at", 0): 81.0, ("at", 1): 82.5, ("at", 2): 80.0,
            ("kd", 0): 79.0, ("kd", 2): 77.0}  # kd seed 1 missing: its difference is left out, not invented
    table = pg.paired_table({k: _report(v) for k, v in top1.items()}, ["none", "kd", "at"], [0, 1, 2])

    assert table["teacher_error"] == pytest.approx(10.0)
    none, at, kd = (table["methods"][m] for m in ("none", "at", "kd"))
    assert none["errors"] == pytest.approx([20.0, 18.0, 22.0])
    assert none["mean"] == pytest.approx(20.0) and none["std"] == pytest.approx(2.0)  # sample std of 20, 18, 22
    assert "diff_vs_none" not in none
    assert at["errors"] == pytest.approx([19.0, 17.5, 20.0])
    assert at["diff_vs_none"]["per_seed"] == pytest.approx([-1.0, -0.5, -2.0])
    assert at["diff_vs_none"]["mean"] == pytest.approx(-3.5 / 3)
    assert at["diff_vs_none"]["std"] == pytest.approx(statistics.stdev([-1.0, -0.5, -2.0]))
    assert kd["errors"][1] is None and kd["n"] == 2
    assert kd["diff_vs_none"]["per_seed"][0] == pytest.approx(1.0) and kd["diff_vs_none"]["per_seed"][1] is None
    assert kd["diff_vs_none"]["per_seed"][2] == pytest.approx(1.0) and kd["diff_vs_none"]["std"] == pytest.approx(0.0)

    one = pg.paired_table({("none", 0): _report(50.0), ("at", 0): _report(55.0)}, ["none", "at"], [0])
    assert one["methods"]["at"]["diff_vs_none"] == {"per_seed": [-5.0], "mean": -5.0, "std": None, "n": 1}


def test_closest_student_needs_the_speedup():
    pg = _module()
    rows = [{"candidate": "zoo:a", "error": 8.0, "teacher_error": 6.0, "latency_speedup": 2.9},  # closest, too slow
            {"candidate": "width:0.5", "error": 9.0, "teacher_error": 6.0, "latency_speedup": 3.4},
            {"candidate": "blocks:2", "error": 10.5, "teacher_error": 6.0, "latency_speedup": 4.0},
            {"candidate": "target:3", "error": 7.0, "teacher_error": 6.0, "latency_speedup": None}]
    p3 = pg.part3_table(rows, 3.0)
    assert p3["closest"] == "width:0.5" and p3["closest_gap_points"] == pytest.approx(3.0)
    assert [r["meets_speedup"] for r in p3["candidates"]] == [False, True, True, False]
    assert pg.part3_table(rows[:1], 3.0)["closest"] is None

    gpu = lambda *ms: {"gpu_latency": {"runs": [{"runtime": "torch-cuda", "batch_size": b, "median_ms": m}  # noqa: E731
                                                for b, m in zip((1, 256), ms)]}}
    report = {"teacher": {"top1": 90.0, **gpu(2.0, 9.0)}, "students": [{"top1": 80.0, **gpu(0.5)}]}
    assert pg.gpu_speedups(report) == {"torch-cuda b1": 4.0}  # only what both were timed at
    assert pg.gpu_speedups(_report(80.0)) == {}


def test_plan_shares_cells_orders_teachers_first_and_resumes(tmp_path):
    pg = _module()
    args = pg.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o")])
    cells = pg.build_plan(args)
    names = [c.name for c in cells]
    # part 4's β = 1000, sum-p:2 is part 1's AT cell; part 5 adds FitNet, DKD and AT+DKD on pair 1 (its none, AT and AT+KD
    # are part 1's) and all six methods on WRN-16-2 ← WRN-40-2 (part 3's teacher; its AT+KD seed 0 is part 3's zoo:wrn-16-2)
    assert len(names) == len(set(names)) == 2 + 12 + 6 + 5 + 5 + 3 * 3 + 6 * 3 - 1
    assert [c.kind for c in cells[:2]] == ["train", "train"] and all(c.kind == "compress" for c in cells[2:])
    shared = next(c for c in cells if c.meta.get("method") == "at" and c.meta.get("seed") == 0 and c.meta["student"] == "wrn-16-1")
    assert shared.parts == [1, 4, 5] and "--beta" not in shared.argv
    derived = next(c for c in cells if c.meta.get("student") == "target:3.3")
    assert derived.argv[derived.argv.index("--target-speedup"):][:4] == ["--target-speedup", "3.3", "--by", "latency"]
    shallow = next(c for c in cells if c.meta.get("student") == "width:1.0+blocks:2")
    assert shallow.argv[shallow.argv.index("--width-ratio"):][:4] == ["--width-ratio", "1.0", "--blocks-per-stage", "2"]
    assert "--init" in derived.argv and derived.argv[derived.argv.index("--init") + 1] == "inherit"
    assert all("--epochs" in c.argv and c.argv[c.argv.index("--epochs") + 1] == "30" for c in cells)

    cell = cells[5]
    assert "--resume" not in cell.command()
    cell.out.mkdir(parents=True)
    (cell.out / "metrics.jsonl").write_text("{}\n")  # a cut run left something behind
    assert cell.command()[-1] == "--resume" and not cell.done()
    (cell.out / "report.json").write_text("{}")
    assert cell.done()


def test_part5_plans_the_rivals_on_both_pairs_with_the_same_seeds(tmp_path):
    pg = _module()
    args = pg.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--parts", "5"])
    cells = [c for c in pg.build_plan(args) if c.kind == "compress"]
    got = {(c.meta["student"], c.meta["teacher"], c.meta["method"], c.meta["seed"]) for c in cells}
    want = {(s, t, m, seed) for s, t in (("wrn-16-1", "wrn-16-2"), ("wrn-16-2", "wrn-40-2"))
            for m in ("none", "at", "at+kd", "fitnet", "dkd", "at+dkd") for seed in (0, 1, 2)}
    assert got == want and len(cells) == 36
    assert all(c.argv[c.argv.index("--method") + 1] == c.meta["method"] for c in cells)
    with pytest.raises(SystemExit):
        pg.parse_args(["--data", str(tmp_path), "--rival-methods", "fitnet,dkd"])  # no baseline to pair with

    reports = {}
    for c in cells:
        if c.meta["teacher"] == "wrn-40-2":
            reports[c.name] = {"report": _report(70.0 + c.meta["seed"] + (2.0 if c.meta["method"] == "fitnet" else 0.0))}
    info = {c.name: reports.get(c.name, {}) for c in cells}
    tables = pg.tables(cells, info, args)["5"]["pairs"]
    assert [(p["student"], p["teacher"]) for p in tables] == [("wrn-16-1", "wrn-16-2"), ("wrn-16-2", "wrn-40-2")]
    fit = tables[1]["methods"]["fitnet"]
    assert fit["diff_vs_none"]["per_seed"] == pytest.approx([-2.0, -2.0, -2.0])  # 2 points more top-1 on every seed
    assert tables[0]["methods"]["fitnet"]["errors"] == [None, None, None]
    md = pg.markdown({"args": {"epochs": 30, "teacher_epochs": 30, "jobs": 1}, "device": {}, "tables": {"5": {"pairs": tables}},
                      "cells": {}, "summary": {"cells": 0, "done": 0, "student_wall_seconds": 0, "teacher_wall_seconds": 0,
                                               "invocations_wall_seconds": 0}, "missing": []})
    assert "### 5b. AT against its rivals (FitNet, DKD): WRN-16-2 ← WRN-40-2" in md and "| FitNet | 27.00 ± 1.00 |" in md


def _script(data, out, *extra):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "paper_gpu.py"), "--data", str(data), "--out", str(out),
           "--results", str(out / "paper_gpu.json"), "--epochs", "1", "--teacher-epochs", "1", "--train-subset", "0",
           "--seeds", "2", "--jobs", "2", "--pair1", "wrn-10-1:wrn-10-2", "--methods", "none,at+kd",
           "--pair2", "wrn-10-2:wrn-10-2", "--teacher3", "wrn-10-2", "--candidates", "zoo:wrn-10-1,width:0.5",
           "--min-speedup", "1.5", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def _check_paired(table):
    methods = table["methods"]
    assert set(methods) == {"none", "at+kd"} and 0 <= table["teacher_error"] <= 100
    for row in methods.values():
        assert len(row["errors"]) == 2 and all(0 <= e <= 100 for e in row["errors"])
        assert row["mean"] == pytest.approx(statistics.fmean(row["errors"]))
    diffs = methods["at+kd"]["diff_vs_none"]["per_seed"]
    assert diffs == pytest.approx([a - b for a, b in zip(methods["at+kd"]["errors"], methods["none"]["errors"])])
    assert methods["at+kd"]["diff_vs_none"]["mean"] == pytest.approx(statistics.fmean(diffs))


@pytest.mark.slow
def test_script_end_to_end_budget_then_finish_then_reuse(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=16, size=32)
    out = tmp_path / "pg"
    args = ("--parts", "1,3")  # part 2 is part 1's code on other cells: the slow test below runs it

    cut = _script(data, out, *args, "--time-budget", "1")  # the teacher starts; no student does
    assert cut.returncode == 0, cut.stdout[-2000:] + cut.stderr[-2000:]
    assert cut.stdout.count("+ atc train") == 1 and "+ atc compress" not in cut.stdout
    assert "cell(s) left" in cut.stdout
    partial = json.loads((out / "paper_gpu.json").read_text())
    students = [n for n, c in partial["cells"].items() if c["kind"] == "compress"]
    assert len(students) == 4 + 1  # part 3's zoo:wrn-10-1 is part 1's AT+KD seed-0 cell
    assert sorted(partial["missing"]) == sorted(students)
    assert partial["tables"]["1"]["methods"]["none"]["errors"] == [None, None]
    assert "Missing (5)" in (out / "paper_gpu.md").read_text()

    full = _script(data, out, *args)
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-2000:]
    assert full.stdout.count("+ atc compress") == 5 and "+ atc train" not in full.stdout
    res = json.loads((out / "paper_gpu.json").read_text())
    assert res["missing"] == [] and res["summary"]["done"] == 6
    _check_paired(res["tables"]["1"])
    cells = res["cells"]
    for name, c in cells.items():
        assert c["wall_seconds"] > 0 and c["command"].startswith("atc ")
        assert c["images_per_s"] and c["images_per_s"] > 0
    p3 = res["tables"]["3"]
    assert {r["candidate"] for r in p3["candidates"]} == {"wrn-10-1", "width:0.5"}
    width = next(r for r in p3["candidates"] if r["candidate"] == "width:0.5")
    assert width["init"] == "inherit" and width["latency_speedup"] > 0
    if p3["closest"] is not None:
        best = next(r for r in p3["candidates"] if r["candidate"] == p3["closest"])
        assert best["latency_speedup"] >= 1.5 and p3["closest_gap_points"] == pytest.approx(best["error"] - best["teacher_error"])
    assert len(res["invocations"]) == 2 and res["device"].get("torch")
    md = (out / "paper_gpu.md").read_text()
    assert "CIFAR-10 (JPEG q75)" in md and "| AT+KD |" in md and "### 3." in md and "Missing" not in md

    again = _script(data, out, *args)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "+ atc" not in again.stdout and "all cells finished" in again.stdout


@pytest.mark.slow
def test_script_same_architecture_beta_grid_and_concurrent_throughput(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=16, size=32)
    out = tmp_path / "pg"
    args = ("--parts", "2,4", "--betas", "300", "--measure-jobs", "2", "--measure-epochs", "1")
    run = _script(data, out, *args)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("+ atc compress") == 3 + 4 + 2  # measuring: 1 alone + 2 at once; part 2: 4; part 4: 2
    res = json.loads((out / "paper_gpu.json").read_text())
    assert res["missing"] == []
    _check_paired(res["tables"]["2"])
    grid = res["tables"]["4"]["errors"]
    assert set(grid) == {"sum-p:2", "max-p:2"} and all(0 <= e <= 100 for row in grid.values() for e in row.values())
    tp = res["throughput"]
    assert tp["jobs"] == 2 and len(tp["concurrent"]["per_run_images_per_s"]) == 2
    assert tp["concurrent"]["images_per_s_sum"] == pytest.approx(sum(tp["concurrent"]["per_run_images_per_s"]))
    assert tp["speedup"] == pytest.approx(tp["concurrent"]["images_per_s_sum"] / tp["single"]["images_per_s"])
    assert not (out / "measure").exists()
    again = _script(data, out, *args)
    assert again.returncode == 0 and "+ atc" not in again.stdout and "already measured" in again.stdout


def test_images_per_s_counts_epoch_one_and_the_cells_say_what_the_step_ran_as():
    pg = _module()
    history = [{"epoch": 1, "images_per_s": 10_000.0, "cuda_graphs": "captured", "cuda_graph_captures": 1},
               {"epoch": 2, "images_per_s": 40_000.0, "cuda_graphs": "captured", "cuda_graph_captures": 1},
               {"epoch": 3, "images_per_s": 40_000.0, "cuda_graphs": "captured", "cuda_graph_captures": 1}]
    # the same images each epoch: all images over all seconds is the harmonic mean, epoch 1 (capture) included
    assert pg.images_per_s(history) == pytest.approx(3 / (1 / 10_000 + 2 / 40_000)) == pytest.approx(20_000)
    assert pg.steady_images_per_s(history) == pytest.approx(40_000) and pg.steady_images_per_s(history[:1]) is None
    assert pg.graph_record(history) == {"state": "captured", "captures": 1, "epochs_captured": 3, "epochs": 3}
    assert pg._graph_cell(pg.graph_record(history)) == "CUDA graph, 1 capture(s), 3/3 epochs"
    eager = [{"epoch": 1, "images_per_s": 5.0, "cuda_graphs": "off", "cuda_graph_captures": 0}]
    assert pg.graph_record(eager)["state"] == "off" and pg._graph_cell(pg.graph_record(eager)) == "off"
    assert pg.graph_record([{"epoch": 1, "images_per_s": 5.0}]) is None and pg.images_per_s([]) is None
