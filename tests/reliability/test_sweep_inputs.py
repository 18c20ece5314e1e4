"""Issue 21, points 4, 10 and 13 at ``atc sweep``: one teacher per sweep, a damaged run.json named,
and a sweep refused on its inputs leaves no folder behind."""

from __future__ import annotations

import pytest

from tests.helpers import assert_error, make_image_folder

# In the main process only (spawned workers import atc afresh): once the sweep has loaded its
# teacher and chosen the student, the teacher file is replaced by another one.
SWAP_TEACHER = ("import shutil, compressor.studies.sweep as sw\n"
                "orig = sw.choose\n"
                "def swapped(*a, **k):\n"
                "    out = orig(*a, **k)\n"
                "    shutil.copy('b.pt', 'a.pt')\n"
                "    return out\n"
                "sw.choose = swapped\n")


@pytest.fixture
def sweep_world(tmp_path, tiny_teacher):
    make_image_folder(tmp_path / "d", per_class=4)
    tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "a.pt", seed=1)
    tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "b.pt", seed=2)
    return tmp_path


def _sweep(*more):
    return ["sweep", "--teacher", "a.pt", "--data", "d", "--preset", "demo", "--student", "wrn-10-1", "--epochs", "1",
            "--grid", "beta=1e2,1e3", "--out", "sw", *more]


@pytest.mark.slow
def test_a_teacher_replaced_during_a_parallel_sweep_does_not_mix_two_teachers(atc, sweep_world):
    """Point 4, done by the sweep runner (issue 24): the teacher is read once and every worker gets
    those bytes, so replacing the file mid-sweep changes nothing; checked here from the outside."""
    import hashlib
    import json

    first = hashlib.sha256((sweep_world / "a.pt").read_bytes()).hexdigest()
    r = atc(*_sweep("--jobs", "2"), cwd=sweep_world, prelude=SWAP_TEACHER)
    assert r.returncode == 0, r.stderr
    result = json.loads((sweep_world / "sw" / "sweep.json").read_text())
    assert result["teacher"]["sha256"] == first != hashlib.sha256((sweep_world / "a.pt").read_bytes()).hexdigest()
    assert not result["failed"] and all(len(c["runs"]) == 1 for c in result["cells"])


def test_a_sweep_refused_on_its_teacher_leaves_no_folder(atc, sweep_world):
    r = atc(*[a if a != "a.pt" else "missing.pt" for a in _sweep()], cwd=sweep_world)
    assert_error(r, "checkpoint missing.pt does not exist")
    assert not (sweep_world / "sw").exists()


@pytest.mark.parametrize("content, phrase", [
    ("{not json", "run.json is damaged (JSONDecodeError); delete that run folder (it is trained again) or use another --out"),
    ("[]", "run.json: field 'config' is missing; delete that run folder"),
])
def test_a_damaged_run_json_is_named(atc, sweep_world, content, phrase):
    run = sweep_world / "sw" / "runs" / "beta=1e2" / "seed-0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(content)
    r = atc(*_sweep("--resume"), cwd=sweep_world)
    line = assert_error(r, phrase, only_line=False)
    assert line.startswith("error: sw/runs/beta=1e2/seed-0/run.json")
    assert (run / "run.json").read_text() == content  # left as it was, for the user to look at
