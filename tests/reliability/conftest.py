"""Fixtures of the reliability tests: the inputs most of them feed to a failing run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_image_folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    """A tiny 3-class image folder, a 4-class one and an untrained wrn-10-1 teacher checkpoint for the 3 classes."""
    root = tmp_path_factory.mktemp("rel")
    tiny = make_image_folder(root / "tiny", per_class=6)
    four = make_image_folder(root / "four", classes=4, per_class=3)
    teacher = tiny_teacher("wrn-10-1", 3, 16, path=root / "teacher.pt", mean=0.1, std=0.2, metrics={"top1": 0.0})
    return {"root": root, "tiny": tiny, "four": four, "teacher": teacher}
