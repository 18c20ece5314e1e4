"""The README's figures come from ``benchmarks/readme_figures.py`` (issue 25): every section has its
marked block in the README, blocks are replaced in place, and the demo block's deterministic
figures (top-1, parameters, multiply-adds and their ratios) match a fresh demo run."""

from __future__ import annotations

import argparse
import importlib.util
import re

import pytest
import torch

from tests.helpers import ROOT

SPEC = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
figures = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(figures)
README = (ROOT / "README.md").read_text()

# columns of the demo table that do not depend on the machine's timing
DETERMINISTIC = ("model", "top-1 %", "Δ top-1", "params", "GMACs", "params ×", "GMACs ×")


def test_every_section_has_a_marked_block_in_the_readme():
    for name in figures.SECTIONS:
        assert figures.read_block(README, name) is not None, f"README.md has no <!-- figures:{name} --> block"


def test_every_block_is_one_the_script_wrote_naming_machine_and_versions():
    """A block the script did not write (pasted, or left from before it existed) has no such first line."""
    for name in figures.SECTIONS:
        first = figures.read_block(README, name).splitlines()[0]
        assert re.match(r"(Measured on|On) .+ \(\d+ cores, (no GPU|GPU .+)\), Python \S+, torch \S+, onnxruntime \S+", first), (name, first)


def test_blocks_are_replaced_in_place_and_missing_markers_refused():
    text = "a\n<!-- figures:x -->\nold\n<!-- /figures:x -->\nb\n"
    new = figures.replace_block(text, "x", "new\nlines\n")
    assert new == "a\n<!-- figures:x -->\nnew\nlines\n<!-- /figures:x -->\nb\n"
    assert figures.read_block(new, "x") == "new\nlines"
    with pytest.raises(SystemExit, match="no <!-- figures:y -->"):
        figures.replace_block(text, "y", "z")


def _table(block: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def _deterministic(block: str) -> list[list[str]]:
    head, rows = _table(block)
    keep = [head.index(c) for c in DETERMINISTIC]
    return [[r[i] for i in keep] for r in rows]


def test_demo_block_renders_the_report_table_with_its_versions():
    report = {"teacher": {"name": "wrn-16-2", "params": 691674, "gmacs": 0.0254, "top1": 99.44, "latency_ms": 0.2},
              "students": [{"name": "wrn-10-1", "params": 77850, "gmacs": 0.0032, "top1": 97.78, "top1_delta": -1.66, "latency_ms": 0.04,
                            "param_ratio": 8.88, "mac_ratio": 8.03, "latency_speedup": 5.5}],
              "latency": {"threads": 1, "rounds": 15}, "data": {"name": "digits"}}
    block = figures.demo_block(report, 61.4, "AMD EPYC (2 cores, no GPU), Python 3.11.7, torch 2.14.1, onnxruntime 1.32.0")
    assert block.startswith("On AMD EPYC (2 cores, no GPU), Python 3.11.7, torch 2.14.1, onnxruntime 1.32.0, `atc demo` took 61 s")
    assert _deterministic(block) == [["wrn-16-2", "99.44", "", "691,674", "0.0254", "1.00", "1.00"],
                                     ["wrn-10-1", "97.78", "-1.66", "77,850", "0.0032", "8.88", "8.03"]]


@pytest.mark.slow
def test_readme_demo_table_matches_a_fresh_demo_run(tmp_path):
    block = figures.read_block(README, "demo")
    quoted = re.search(r"torch (\S+),", block)
    assert quoted, "the demo block names no torch version"
    if quoted.group(1) != torch.__version__:
        pytest.skip(f"the README's demo figures are for torch {quoted.group(1)}; this is {torch.__version__} "
                    "(python benchmarks/readme_figures.py --only demo --write-readme rewrites them)")
    fresh = figures.demo(argparse.Namespace(out=tmp_path))
    assert _deterministic(fresh["markdown"]) == _deterministic(block)
