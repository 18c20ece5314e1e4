"""`atc sweep` on the runner: a run that fails is reported while the others finish (and --resume tries it
again), --ray without Ray installed, --ray without an address, and a killed sweep resumed (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cli.app import app
from cli.common import fill_optional_values
from compressor.errors import ConfigError
from compressor.studies import sweep
from compressor.studies.runner import CELL_FILE, ERROR_FILE, Engine
from tests.helpers import ROOT, hooked_env, make_image_folder, slowed_call_hook

BASE = {"train": {"epochs": 1, "batch_size": 8}}


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("sweep-engines")
    return tiny_teacher("wrn-10-1", 3, 16, path=d / "t.pt"), make_image_folder(d / "data", classes=3, per_class=8, size=16)


def test_a_failing_run_is_reported_the_others_finish_and_resume_retries_it(teacher_and_data, tmp_path, monkeypatch):
    teacher, data = teacher_and_data
    real = sweep.distill_student

    def flaky(cand, loaded, cfg, *args, **kwargs):
        if cfg.distill.beta == 100:
            raise RuntimeError("the GPU fell off the bus")
        return real(cand, loaded, cfg, *args, **kwargs)

    monkeypatch.setattr(sweep, "distill_student", flaky)
    out = tmp_path / "sw"
    argv = ["sweep", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--preset", "demo", "--grid",
            "beta=1e2,1e3,3e3", "--method", "at", "--student", "wrn-10-1", "--epochs", "1", "--set", "train.batch_size=8",
            "--device", "cpu"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 1, r.output
    assert "error: 1 run(s) did not finish (runs/beta=1e2/seed-0: RuntimeError: the GPU fell off the bus)" in r.stderr
    result = json.loads((out / "sweep.json").read_text())
    assert [c["n"] for c in result["cells"]] == [0, 1, 1]
    assert result["failed"] == [{"run": "runs/beta=1e2/seed-0", "status": "failed", "error": "RuntimeError: the GPU fell off the bus"}]
    assert "RuntimeError" in (out / "runs/beta=1e2/seed-0" / ERROR_FILE).read_text()
    assert "`runs/beta=1e2/seed-0` (failed): RuntimeError" in (out / "sweep.md").read_text()
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("student.pt")}
    assert len(finished) == 2
    monkeypatch.setattr(sweep, "distill_student", real)  # the cause fixed
    r = CliRunner().invoke(app, argv + ["--resume", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["failed"] == [] and [c["n"] for c in result["cells"]] == [1, 1, 1]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # only the failed run trained again
    assert not (out / "runs/beta=1e2/seed-0" / ERROR_FILE).exists()


def test_ray_missing_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"^--ray needs Ray, an optional extra: pip install 'atc\[ray\]'$"):
        sweep.run_sweep(tmp_path / "no-such-teacher.pt", "digits", tmp_path / "sw", "demo", ["beta=0,1e3"],
                        engine=Engine(ray="local"))
    assert not (tmp_path / "sw").exists()


def test_ray_without_an_address_means_a_local_ray():
    assert fill_optional_values(["--ray"]) == ["--ray", "local"]
    assert fill_optional_values(["--ray", "--jobs", "2"]) == ["--ray", "local", "--jobs", "2"]
    assert fill_optional_values(["--ray", "head:6379", "--resume"]) == ["--ray", "head:6379", "--resume"]
    assert fill_optional_values(["--jobs", "2"]) == ["--jobs", "2"]


# Run by every process of the first sweep (the driver and its spawned workers; tests.helpers.hooked_env): runs
# with β ≥ 3e3 never end, so the kill always lands with exactly the two others finished, however loaded the
# machine is (a kill timed on the first finished run raced the second pair, 0.4 s each here). The run's
# config is distill_student's third argument.
HANG_LATE_RUNS = slowed_call_hook("compressor.studies", "sweep", "distill_student", 3600, when="args[2].distill.beta >= 3e3")


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_trains_only_the_missing_runs(teacher_and_data, tmp_path):
    teacher, data = teacher_and_data
    out = tmp_path / "sw"

    def start(resume: bool) -> subprocess.Popen:
        argv = ["sweep", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--preset", "demo", "--grid",
                "beta=1e2,1e3,3e3,1e4", "--method", "at", "--student", "wrn-10-1", "--epochs", "3", "--set", "train.batch_size=8",
                "--device", "cpu", "--jobs", "2", *(["--resume"] if resume else [])]
        env = {**os.environ, "COLUMNS": "200"}
        if not resume:
            env = hooked_env(tmp_path / "hook", HANG_LATE_RUNS, env)
        return subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env=env)

    proc = start(False)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob(f"runs/*/seed-0/{CELL_FILE}"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as a lost machine
    proc.wait(timeout=60)
    done_before = {p.parent: p.stat().st_mtime_ns for p in out.glob(f"runs/*/seed-0/{CELL_FILE}")}
    assert sorted(d.parent.name for d in done_before) == ["beta=1e2", "beta=1e3"], proc.stdout.read()
    assert not (out / "sweep.json").exists()
    again = start(True)
    log = again.communicate(timeout=600)[0]
    assert again.returncode == 0, log
    result = json.loads((out / "sweep.json").read_text())
    assert [c["n"] for c in result["cells"]] == [1, 1, 1, 1] and result["failed"] == []
    assert {d: (d / CELL_FILE).stat().st_mtime_ns for d in done_before} == done_before  # finished runs were not trained again
    assert "2 of 4 cells finished earlier (reused)" in log
