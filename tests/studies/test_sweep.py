"""`atc sweep`: grid parsing, cell configurations, aggregation by hand, a tiny sweep end to end and its re-run."""

from __future__ import annotations

import json

import pytest

from compressor.errors import ConfigError, OutputError
from compressor.options import RunOptions
from compressor.studies.runner import Engine
from compressor.studies.sweep import Cell, cell_config, expand, parse_grid, summarize
from tests.helpers import make_image_folder


def test_parse_grid_and_expand():
    axes = parse_grid(["beta=0,1e2,1e3", "attention=sum-p:1,max-p:2,gradient"])
    assert [(a.key, a.values) for a in axes] == [("beta", ("0", "1e2", "1e3")), ("attention", ("sum-p:1", "max-p:2", "gradient"))]
    cells = expand(axes)
    assert len(cells) == 9 and cells[0].params == {"beta": "0", "attention": "sum-p:1"}
    assert cells[-1].params == {"beta": "1e3", "attention": "gradient"}
    assert [c.params for c in expand(parse_grid(["train.lr=0.1,0.05"]))] == [{"train.lr": "0.1"}, {"train.lr": "0.05"}]


@pytest.mark.parametrize("bad, words", [
    (["beta"], "key=v1,v2"), (["beta="], "key=v1,v2"), (["colour=red"], "unknown"), (["data.train_subset=10,20"], "cannot vary"),
    (["attention=sum-q:2"], "unknown"), (["beta=1,1"], "repeats"), (["beta=1", "beta=2"], "twice"), ([], "at least one"),
])
def test_parse_grid_errors(bad, words):
    with pytest.raises(ConfigError, match=words):
        parse_grid(bad)


def test_cell_config_maps_keys_and_shares_beta_zero_runs():
    cfg, slug = cell_config("demo", {}, Cell({"beta": "1e2", "attention": "max-p:4"}), "at", 3)
    d = cfg.distill
    assert (d.beta, d.attention, d.p, cfg.train.seed) == (100.0, "max-p", 4.0, 3)
    assert slug == "beta=1e2_attention=max-p-4"
    cfg, slug = cell_config("demo", {}, Cell({"beta": "1e3", "attention": "gradient"}), "at+kd", 0)
    assert cfg.distill.attention == "gradient" and slug == "beta=1e3_attention=gradient"
    # At β = 0 (or without AT) the mechanism is dropped: all such cells train the same student.
    a = cell_config("demo", {}, Cell({"beta": "0", "attention": "max-p:4"}), "at", 0)
    b = cell_config("demo", {}, Cell({"beta": "0", "attention": "gradient"}), "at", 0)
    assert a[1] == b[1] == "beta=0" and a[0] == b[0] and a[0].distill.attention == "sum-p"
    c = cell_config("demo", {}, Cell({"beta": "1e3", "attention": "gradient"}), "kd", 0)
    assert c[1] == "beta=1e3" and c[0].distill.attention == "sum-p"


def test_summarize_by_hand():
    assert summarize([70.0, 72.0, 74.0]) == {"n": 3, "mean": 72.0, "std": 2.0, "median": 72.0}
    s = summarize([10.0, 11.0, 15.0, 20.0])  # mean 14, sample var (16 + 9 + 1 + 36) / 3
    assert s["mean"] == 14.0 and s["median"] == 13.0 and s["std"] == pytest.approx((62 / 3) ** 0.5)
    assert summarize([50.0]) == {"n": 1, "mean": 50.0, "std": 0.0, "median": 50.0}
    assert summarize([])["mean"] is None


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("sweep")
    data = make_image_folder(d / "data", classes=3, per_class=8, size=16)
    return tiny_teacher("wrn-10-1", 3, 16, path=d / "t.pt", mean=0.2, std=0.3), data


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_rerun(teacher_and_data, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app
    from compressor.studies.sweep import run_sweep

    teacher, data = teacher_and_data
    out = tmp_path / "sw"
    grid = ["beta=0,1e3", "attention=sum-p:2,gradient"]
    base = {"train": {"epochs": 1, "batch_size": 8}}
    res = run_sweep(teacher, data, out, "demo", grid, overrides=base, seeds=2, method="at", student="wrn-10-1")
    cells = res["cells"]
    assert [c["params"] for c in cells] == [{"beta": "0", "attention": "sum-p:2"}, {"beta": "0", "attention": "gradient"},
                                            {"beta": "1e3", "attention": "sum-p:2"}, {"beta": "1e3", "attention": "gradient"}]
    assert [r["seed"] for r in cells[2]["runs"]] == [0, 1] and all(c["n"] == 2 for c in cells)
    assert cells[0]["runs"] == cells[1]["runs"]  # β = 0: one shared run per seed
    assert len({r["dir"] for c in cells for r in c["runs"]}) == 6
    for c in cells:
        tops = [r["top1"] for r in c["runs"]]
        assert c["mean"] == pytest.approx(sum(tops) / 2) and c["median"] == pytest.approx(sum(tops) / 2)
        assert c["std"] == pytest.approx(abs(tops[0] - tops[1]) / 2 ** 0.5)
    # Every run really trained with its cell's settings.
    grad_run = json.loads((out / cells[3]["runs"][0]["dir"] / "metrics.jsonl").read_text().splitlines()[0])
    assert grad_run["train_at"] > 0
    zero_run = json.loads((out / cells[0]["runs"][0]["dir"] / "metrics.jsonl").read_text().splitlines()[0])
    assert zero_run["train_at"] == 0
    md = (out / "sweep.md").read_text()
    assert "| beta | attention | n | top-1 mean ± std | median | per seed |" in md and md.count("\n| 1e3 |") == 2
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "sweep.json").read_text())["cells"] == json.loads(json.dumps(cells))

    # Re-run through the CLI: refused without --resume; with it nothing is trained again.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("student.pt")}
    argv = ["sweep", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--preset", "demo", "--grid", grid[0],
            "--grid", grid[1], "--seeds", "2", "--method", "at", "--student", "wrn-10-1", "--epochs", "1",
            "--set", "train.batch_size=8", "--json"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 1 and isinstance(r.exception, OutputError) and "pass --resume" in str(r.exception)
    r = CliRunner().invoke(app, argv + ["--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cells"] == json.loads(json.dumps(cells))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("student.pt")} == mtimes and len(mtimes) == 6
    # Changing the recipe under the same --out is refused instead of mixing results.
    with pytest.raises(OutputError, match="other settings"):
        run_sweep(teacher, data, out, "demo", grid, overrides={"train": {"epochs": 1, "batch_size": 8, "lr": 0.2}}, seeds=1,
                  method="at", student="wrn-10-1", options=RunOptions(resume=True))


@pytest.mark.slow
def test_jobs_train_runs_in_processes_with_the_same_results(teacher_and_data, tmp_path):
    from compressor.studies.sweep import run_sweep

    teacher, data = teacher_and_data
    kwargs = dict(overrides={"train": {"epochs": 1, "batch_size": 8}}, seeds=1, method="at", student="wrn-10-1",
                  options=RunOptions(device="cpu"))
    one = run_sweep(teacher, data, tmp_path / "one", "demo", ["beta=1e2,1e3"], **kwargs)
    two = run_sweep(teacher, data, tmp_path / "two", "demo", ["beta=1e2,1e3"], engine=Engine(jobs=2), **kwargs)
    assert [c["params"] for c in two["cells"]] == [c["params"] for c in one["cells"]]
    # Each process seeds the run as the sequential loop does, so the CPU results agree exactly.
    assert [r["top1"] for c in two["cells"] for r in c["runs"]] == [r["top1"] for c in one["cells"] for r in c["runs"]]
    assert all((tmp_path / "two" / r["checkpoint"]).exists() for c in two["cells"] for r in c["runs"])
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        Engine(jobs=0)
