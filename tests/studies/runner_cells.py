"""Cell functions for the runner's tests. They live in an importable module (not in a test file) because
worker processes and Ray tasks import them by name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def echo(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Log that the cell ran, optionally wait or raise, and say where it ran."""
    if payload.get("log"):
        with open(payload["log"], "a") as f:
            f.write(payload["name"] + "\n")
    if payload.get("raise"):
        raise ValueError(payload["raise"])
    if payload.get("die"):
        os._exit(3)  # as a segfault or the OOM killer would: no exception, no goodbye
    release = payload.get("wait_for")
    deadline = time.time() + payload.get("sleep", 0)
    while time.time() < deadline or (release and not Path(release).exists()):
        time.sleep(0.05)
    out = {"name": payload["name"], "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
           "threads": os.environ.get("OMP_NUM_THREADS"), "begin": payload.get("begin")}
    if payload.get("shared"):
        path = ctx.path(payload["shared"])
        out["shared_bytes"] = path.read_bytes().decode()
        out["sha256"] = ctx.sha256(payload["shared"])
    return out
