"""The sweep runner on a real local Ray (``ray.init(num_cpus=2)``, one session for the module): the same
per-cell top-1 as one cell after another, a raising cell reported while the others finish, and the
teacher's bytes put into the object store once."""

from __future__ import annotations

import pytest

from compressor.studies.runner import CELL_FILE, Blob, Engine, Task, read_record, run_cells
from tests.studies.runner_cells import echo, train_digits

ray = pytest.importorskip("ray", reason="Ray is the optional extra atc[ray] (part of atc[dev])")


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


def _digits_tasks(root, methods=("none", "kd", "at", "at+kd")):
    overrides = {"train": {"epochs": 1, "batch_size": 64}, "data": {"train_subset": 320, "test_subset": 200}}
    return [Task(m, root / m, {"overrides": overrides, "student": "wrn-10-1", "method": m, "out": str(root / m)}) for m in methods]


def test_a_four_cell_digits_sweep_on_ray_matches_one_cell_after_another(local_ray, digits_teacher, tmp_path, monkeypatch):
    shared = {"teacher": Blob.read(digits_teacher)}
    # One torch thread per run in both: on the CPU the thread count changes the rounding.
    one = run_cells(train_digits, _digits_tasks(tmp_path / "one"), Engine(gpus=0, cpus_per_run=1), shared=shared)
    puts = []
    real_put = local_ray.put
    monkeypatch.setattr(local_ray, "put", lambda value, **kw: puts.append(len(value)) or real_put(value, **kw))
    on_ray = run_cells(train_digits, _digits_tasks(tmp_path / "ray"), Engine(ray="local", gpus=0, cpus_per_run=1), shared=shared)
    assert [o.status for o in on_ray] == ["done"] * 4, [o.error for o in on_ray]
    assert [o.value["top1"] for o in on_ray] == [o.value["top1"] for o in one]
    assert len({o.value["top1"] for o in one}) > 1  # the methods really trained different students
    assert puts == [digits_teacher.stat().st_size]  # the teacher went into the object store once, not per task
    assert all(o.value["pid"] != on_ray[0].value["pid"] or o is on_ray[0] for o in on_ray[:2])  # two workers at once
    assert all((tmp_path / "ray" / m / CELL_FILE).exists() for m in ("none", "kd", "at", "at+kd"))


def test_a_raising_cell_on_ray_is_reported_while_the_others_finish(local_ray, tmp_path):
    tasks = [Task(f"c{i}", tmp_path / f"c{i}", {"name": f"c{i}", **({"raise": "bad grid point"} if i == 2 else {})})
             for i in range(4)]
    out = run_cells(echo, tasks, Engine(ray="local", cpus_per_run=1))
    assert [o.status for o in out] == ["done", "done", "failed", "done"]
    assert out[2].error == "ValueError: bad grid point"
    assert all(o.value["threads"] == "1" for o in out if o.value)  # Ray gives each task its num_cpus as threads
    assert read_record(tasks[3].folder, "c3")["value"]["name"] == "c3"
    again = run_cells(echo, tasks[:2], Engine(ray="local", resume=True))
    assert [o.status for o in again] == ["reused", "reused"]
