"""What a newcomer types first (issue 25): ``atc``, ``atc --version``, ``atc --help``."""

import re

import pytest

from compressor import __version__
from tests.helpers import run_atc


def test_version():
    r = run_atc("--version")
    assert r.returncode == 0 and r.stderr == ""
    assert re.fullmatch(rf"atc {re.escape(__version__)} \(torch [^,]+, onnxruntime [^,]+, Python 3\.\d+\.\d+\)\n", r.stdout)


def test_bare_atc_prints_the_usage_not_an_error_line():
    r = run_atc()
    assert r.returncode == 2  # as click's no_args_is_help does
    text = r.stdout + r.stderr
    assert text.startswith("Usage: atc [OPTIONS] COMMAND [ARGS]...") and "error:" not in text
    assert "\nCommands:\n" in text and len(text.splitlines()) > 10  # the help as it is, not folded into one line


def test_help_lists_every_command_with_a_whole_description():
    r = run_atc("--help")
    assert r.returncode == 0
    listing = r.stdout.split("Commands:\n", 1)[1].splitlines()
    names = [line.split()[0] for line in listing if line.strip()]
    assert names == ["train", "compress", "derive", "profile", "export", "report", "demo", "attention", "sweep", "models", "inspect"]
    for line in listing:
        assert not line.rstrip().endswith("...") and line.rstrip()[-1] in ".)", line  # not cut mid-phrase


def test_the_demo_trains_on_one_thread_whatever_the_machine_has(tmp_path, monkeypatch):
    # thread counts order the sums differently: on more threads the demo's accuracies would not be the README's
    import torch

    import cli.compress as commands
    from compressor import pipeline
    from compressor.distill import scratch

    seen: list[tuple[str, int]] = []

    class Enough(Exception):
        pass

    monkeypatch.setattr(scratch, "train_model", lambda *a, **k: seen.append(("teacher", torch.get_num_threads())))

    def compress(*a, **k):
        seen.append(("students", torch.get_num_threads()))
        raise Enough

    monkeypatch.setattr(pipeline, "compress", compress)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Enough):
            commands.demo(out=tmp_path / "demo", overwrite=False, students=1, threads=1, pick="auto", device="cpu")
        assert seen == [("teacher", 1), ("students", 1)]
        assert torch.get_num_threads() == 2  # restored for whatever the caller does next
    finally:
        torch.set_num_threads(before)
