"""What a newcomer types first (issue 25): ``atc``, ``atc --version``, ``atc --help``."""

import re

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
