"""The sweep runner without Ray: placement on a (fake) multi-GPU node, worker processes pinned to their GPU,
a failing cell reported while the others finish, resume after the driver was killed, the shared teacher
bytes, and the one-line error when Ray is missing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from compressor.errors import ConfigError, Interrupted, OutputError
from compressor.studies import runner
from compressor.studies.runner import CELL_FILE, ERROR_FILE, Blob, Engine, Task, gpu_slots, read_record, run_cells
from tests.helpers import ROOT
from tests.studies.runner_cells import echo


def test_runs_land_round_robin_on_a_fake_four_gpu_node():
    assert gpu_slots(8, 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert gpu_slots(5, 4) == [0, 1, 2, 3, 0]
    assert gpu_slots(3, 4) == [0, 1, 2]
    # Half a GPU per run: two on each GPU, eight at once on four GPUs.
    half = gpu_slots(8, 4, 0.5)
    assert half == [0, 1, 2, 3, 0, 1, 2, 3] and Counter(half) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert gpu_slots(12, 4, 0.5) == [0, 1, 2, 3] * 2  # no more than fit
    assert gpu_slots(8, 4, 1.0) == [0, 1, 2, 3]
    assert Counter(gpu_slots(16, 4, 0.25)) == {0: 4, 1: 4, 2: 4, 3: 4}
    assert gpu_slots(16, 4, 0.3) == [0, 1, 2, 3] * 3  # ⌊1/0.3⌋ = 3 per GPU
    assert gpu_slots(3, 0) == [None, None, None]  # no GPU: plain CPU workers


def test_gpu_share_and_visible_devices():
    assert runner.share_per_run(Engine(jobs=4), 4) == 1.0
    assert runner.share_per_run(Engine(jobs=8), 4) == 0.5
    assert runner.share_per_run(Engine(jobs=6, gpus_per_run=0.25), 4) == 0.25
    assert runner.share_per_run(Engine(jobs=6), 0) == 0.0
    # A node whose own CUDA_VISIBLE_DEVICES already narrows the GPUs: worker k gets the k-th of those.
    assert runner.visible_device(1, "4,6") == "6" and runner.visible_device(0, None) == "0" and runner.visible_device(2, "") == "2"
    assert runner.visible_device(0, "GPU-aa, GPU-bb") == "GPU-aa"
    for bad in (0, 1.5, -0.5):
        with pytest.raises(ConfigError, match="--gpus-per-run"):
            Engine(gpus_per_run=bad)
    with pytest.raises(ConfigError, match="--jobs"):
        Engine(jobs=0)


def _tasks(tmp_path: Path, n: int, **payload) -> list[Task]:
    return [Task(f"c{i}", tmp_path / "cells" / f"c{i}", {"name": f"c{i}", **payload}) for i in range(n)]


def test_worker_processes_see_one_gpu_each_on_a_fake_node(tmp_path):
    """Four workers at half a GPU each on a fake two-GPU node: the first four cells land on 0, 1, 0, 1
    (each worker's CUDA_VISIBLE_DEVICES), later cells reuse the workers, never more than two per GPU."""
    tasks = _tasks(tmp_path, 6, sleep=0.5)
    out = run_cells(echo, tasks, Engine(jobs=4, gpus=2, gpus_per_run=0.5, cpus_per_run=1))
    assert [o.status for o in out] == ["done"] * 6
    assert [o.value["devices"] for o in out[:4]] == ["0", "1", "0", "1"]
    assert {o.value["devices"] for o in out} == {"0", "1"} and all(o.value["threads"] == "1" for o in out)
    by_pid = {}
    for o in out:
        by_pid.setdefault(o.value["pid"], set()).add(o.value["devices"])
    assert len(by_pid) == 4 and all(len(d) == 1 for d in by_pid.values())  # a worker keeps its GPU
    assert Counter(next(iter(d)) for d in by_pid.values()) == {"0": 2, "1": 2}
    assert os.getpid() not in by_pid


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_raising_cell_is_reported_while_the_others_finish(tmp_path, jobs):
    tasks = _tasks(tmp_path, 4)
    tasks[1] = Task("c1", tasks[1].folder, {"name": "c1", "raise": "this cell is broken"})
    seen = []
    out = run_cells(echo, tasks, Engine(jobs=jobs, gpus=0), on_outcome=seen.append)
    assert [o.status for o in out] == ["done", "failed", "done", "done"]
    assert out[1].error == "ValueError: this cell is broken" and out[1].value is None
    assert "Traceback" in (tasks[1].folder / ERROR_FILE).read_text() and not (tasks[1].folder / CELL_FILE).exists()
    assert all(read_record(t.folder, t.key)["value"]["name"] == t.key for t in (tasks[0], tasks[2], tasks[3]))
    assert sorted(o.key for o in seen) == ["c0", "c1", "c2", "c3"]
    # --resume runs only the failed cell again; fixed, it finishes and its error file goes.
    tasks[1] = Task("c1", tasks[1].folder, {"name": "c1"})
    again = run_cells(echo, tasks, Engine(jobs=jobs, gpus=0), resume=True)
    assert [o.status for o in again] == ["reused", "done", "reused", "reused"]
    assert not (tasks[1].folder / ERROR_FILE).exists() and again[0].value == out[0].value


def test_a_worker_that_dies_takes_only_its_own_cell(tmp_path):
    tasks = _tasks(tmp_path, 4)
    tasks[0] = Task("c0", tasks[0].folder, {"name": "c0", "die": True})
    out = run_cells(echo, tasks, Engine(jobs=2, gpus=0))
    assert [o.status for o in out] == ["failed", "done", "done", "done"]
    assert "worker process died" in out[0].error


def test_earlier_runs_are_refused_without_resume_and_reused_with_it(tmp_path):
    log = tmp_path / "ran.txt"
    tasks = _tasks(tmp_path, 3, log=str(log))
    run_cells(echo, tasks, Engine())
    with pytest.raises(OutputError, match="pass --resume"):
        run_cells(echo, tasks, Engine())
    out = run_cells(echo, tasks, Engine(), resume=True)
    assert [o.status for o in out] == ["reused"] * 3 and log.read_text().split() == ["c0", "c1", "c2"]
    # A damaged record names its file and field instead of being trusted.
    (tasks[2].folder / CELL_FILE).write_text(json.dumps({"key": "c2", "value": [1]}))
    with pytest.raises(OutputError, match=r"cell\.json: field 'value'.*delete"):
        run_cells(echo, tasks, Engine(), resume=True)
    (tasks[2].folder / CELL_FILE).write_text(json.dumps({"key": "c9", "value": {}}))
    with pytest.raises(OutputError, match="records cell 'c9', not 'c2'"):
        run_cells(echo, tasks, Engine(), resume=True)


def test_dependencies_run_first_and_a_failed_one_skips_its_dependents(tmp_path):
    log = tmp_path / "ran.txt"
    t = [Task("teacher", tmp_path / "t", {"name": "teacher", "log": str(log)}),
         Task("bad", tmp_path / "b", {"name": "bad", "log": str(log), "raise": "no"}),
         Task("s1", tmp_path / "s1", {"name": "s1", "log": str(log)}, after=("teacher",)),
         Task("s2", tmp_path / "s2", {"name": "s2", "log": str(log)}, after=("bad",))]
    out = run_cells(echo, list(reversed(t)), Engine(jobs=2, gpus=0))
    status = {o.key: o.status for o in out}
    assert status == {"teacher": "done", "bad": "failed", "s1": "done", "s2": "skipped"}
    ran = log.read_text().split()
    assert "s2" not in ran and ran.index("teacher") < ran.index("s1")
    # No new launches after the budget: what has not started is reported as not run.
    t2 = _tasks(tmp_path / "budget", 3)
    out = run_cells(echo, t2, Engine(), keep_launching=lambda: not (t2[0].folder / CELL_FILE).exists())
    assert [o.status for o in out] == ["done", "not run", "not run"]


def test_cells_get_the_shared_bytes_read_once_even_if_the_file_changes(tmp_path):
    src = tmp_path / "teacher.pt"
    src.write_bytes(b"first teacher")
    blob = Blob.read(src)
    src.write_bytes(b"another teacher")  # replaced while the sweep runs
    out = run_cells(echo, _tasks(tmp_path, 2, shared="teacher"), Engine(jobs=2, gpus=0), shared={"teacher": blob})
    assert [o.value["shared_bytes"] for o in out] == ["first teacher"] * 2
    assert out[0].value["sha256"] == hashlib.sha256(b"first teacher").hexdigest()
    bad = Blob("teacher.pt", blob.sha256, b"tampered")
    out = run_cells(echo, _tasks(tmp_path / "bad", 1, shared="teacher"), Engine(), shared={"teacher": bad})
    assert out[0].status == "failed" and "SHA-256" in out[0].error


def test_ray_missing_gives_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(ConfigError, match=r"^--ray needs Ray, an optional extra: pip install 'atc\[ray\]'$"):
        run_cells(echo, _tasks(tmp_path, 1), Engine(ray="local"))


DRIVER = """
import sys
from pathlib import Path
from compressor.studies.runner import Engine, Task, run_cells
from tests.studies.runner_cells import echo
root, resume, release = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
tasks = [Task(f"c{i}", root / f"c{i}", {"name": f"c{i}", "log": str(root / "ran.txt"),
              **({"wait_for": release} if i >= 2 else {})}) for i in range(4)]
out = run_cells(echo, tasks, Engine(jobs=2, gpus=0), resume=resume)
print(" ".join(o.status for o in out))
"""


def _driver(root: Path, resume: bool, release: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(root), "1" if resume else "0", str(release)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_killed_driver_resumes_with_only_the_missing_cells(tmp_path):
    """The driver and its workers are killed (SIGKILL, as a lost machine) while cells 2 and 3 run; the rerun
    with --resume trains only those two."""
    root, release = tmp_path / "study", tmp_path / "release"
    proc = _driver(root, False, release)
    deadline = time.time() + 60
    log = root / "ran.txt"
    while time.time() < deadline and not (log.exists() and {"c2", "c3"} <= set(log.read_text().split())):
        time.sleep(0.1)
    assert {"c2", "c3"} <= set(log.read_text().split()), proc.communicate(timeout=30)[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (root / "c0" / CELL_FILE).exists() and (root / "c1" / CELL_FILE).exists()
    assert not (root / "c2" / CELL_FILE).exists() and not (root / "c3" / CELL_FILE).exists()
    log.write_text("")
    release.touch()
    again = _driver(root, True, release)
    out = again.communicate(timeout=90)[0]
    assert again.returncode == 0, out
    assert out.strip().splitlines()[-1] == "reused reused done done"
    assert sorted(log.read_text().split()) == ["c2", "c3"]


def test_a_stopped_cell_stops_the_study_and_says_how_to_continue(tmp_path):
    """A cell that ends with Interrupted (training caught Ctrl-C and saved its state) stops the launching; the
    study raises Interrupted naming --resume."""
    tasks = _tasks(tmp_path, 3)

    def work(payload, ctx):
        if payload["name"] == "c1":
            raise Interrupted("stopped by SIGINT at epoch 2", signal.SIGINT)
        return {"name": payload["name"]}

    seen = []
    with pytest.raises(Interrupted, match="1 of 3 cells finished.*--resume"):
        run_cells(work, tasks, Engine(), on_outcome=seen.append)
    assert [o.status for o in seen] == ["done", "stopped", "not run"]
