"""The sweep runner on a real local Ray (``ray.init(num_cpus=2)``, one session for the module): a 4-cell
digits sweep with the same per-cell top-1 as ``--jobs 1`` and the teacher's bytes put into the object store
once; a raising cell reported while the others finish."""

from __future__ import annotations

import json
import os

import pytest

from compressor.errors import ConfigError
from compressor.options import RunOptions
from compressor.studies.runner import CELL_FILE, Engine, Task, import_ray, read_record, run_cells
from compressor.studies.sweep import run_sweep
from tests.studies.runner_cells import echo

try:  # imported the way a local sweep imports it: told first that it serves this machine alone (loopback)
    ray = import_ray(local=True)
except ConfigError:
    pytest.skip("Ray is the optional extra atc[ray] (part of atc[dev])", allow_module_level=True)


@pytest.fixture(scope="module")
def local_ray():
    from compressor.studies.runner import start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(cpus=2, gpus=0)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_teacher(tiny_teacher):
    return tiny_teacher("wrn-10-1", classes=10, class_names=[str(i) for i in range(10)])


DIGITS = dict(overrides={"train": {"epochs": 1, "batch_size": 64}, "data": {"train_subset": 320, "test_subset": 200}},
              seeds=1, method="at", student="wrn-10-1", options=RunOptions(device="cpu"))


@pytest.mark.slow
def test_a_four_cell_digits_sweep_on_ray_matches_jobs_1(local_ray, digits_teacher, tmp_path, monkeypatch):
    """``atc sweep --ray`` against ``--jobs 1``, one torch thread per run in both (on the CPU the thread count
    changes the rounding): the same per-cell top-1, and the teacher put into the object store once."""
    grid = ["beta=0,1e2,1e3,3e3"]
    one = run_sweep(digits_teacher, "digits", tmp_path / "one", "demo", grid, engine=Engine(cpus_per_run=1), **DIGITS)
    puts = []
    real_put = local_ray.put
    monkeypatch.setattr(local_ray, "put", lambda value, **kw: puts.append(len(value)) or real_put(value, **kw))
    on_ray = run_sweep(digits_teacher, "digits", tmp_path / "ray", "demo", grid, engine=Engine(ray="local", cpus_per_run=1),
                       **DIGITS)
    assert on_ray["failed"] == [] and [c["n"] for c in on_ray["cells"]] == [1, 1, 1, 1]
    tops = [c["runs"][0]["top1"] for c in on_ray["cells"]]
    assert tops == [c["runs"][0]["top1"] for c in one["cells"]]
    assert len(set(tops)) > 1  # the cells really trained different students
    assert puts == [digits_teacher.stat().st_size]  # the teacher's bytes went into the object store once, not per task
    pids = {json.loads((tmp_path / "ray" / r["dir"]).parent.parent.joinpath(CELL_FILE).read_text())["where"]
            for c in on_ray["cells"] for r in c["runs"]}
    assert len(pids) >= 2  # Ray workers (two at once: num_cpus=2, one CPU per run), none of them this process
    assert not any(f"pid {os.getpid()}" in p for p in pids)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # nothing listens beyond this machine


def test_a_raising_cell_on_ray_is_reported_while_the_others_finish(local_ray, tmp_path):
    tasks = [Task(f"c{i}", tmp_path / f"c{i}", {"name": f"c{i}", **({"raise": "bad grid point"} if i == 2 else {})})
             for i in range(4)]
    out = run_cells(echo, tasks, Engine(ray="local", cpus_per_run=1))
    assert [o.status for o in out] == ["done", "done", "failed", "done"]
    assert out[2].error == "ValueError: bad grid point"
    assert all(o.value["threads"] == "1" for o in out if o.value)  # Ray gives each task its num_cpus as threads
    assert read_record(tasks[3].folder, "c3")["value"]["name"] == "c3"
    again = run_cells(echo, tasks[:2], Engine(ray="local"), resume=True)
    assert [o.status for o in again] == ["reused", "reused"]
