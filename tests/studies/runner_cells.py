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


def train_digits(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """One real distillation cell on the bundled digits: the teacher from the shared bytes (loaded once per
    worker process), the student and settings from the payload."""
    import torch

    from compressor.config import load_config
    from compressor.derive.candidates import StudentChoice, choose_students
    from compressor.distill.student import distill_student
    from compressor.load import load_teacher_and_data
    from compressor.options import RunOptions

    cfg = load_config("demo", payload["overrides"])
    key = ("digits-teacher", ctx.sha256("teacher"))
    if key not in ctx.cache:
        ctx.cache[key] = load_teacher_and_data(ctx.path("teacher"), "digits", cfg)
    loaded = ctx.cache[key]
    cand = choose_students(loaded.spec, cfg, StudentChoice(names=(payload["student"],)))[0]
    torch.manual_seed(cfg.train.seed)
    res = distill_student(cand, loaded, cfg, payload["method"], Path(payload["out"]), torch.device("cpu"),
                          options=RunOptions(resume=ctx.resume))
    return {"top1": float(res.top1), "pid": os.getpid()}
