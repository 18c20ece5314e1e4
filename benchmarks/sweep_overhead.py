"""What running a sweep's cells as Ray tasks costs against local worker processes, on one machine.

The same 4-cell digits sweep (``atc sweep --grid beta=0,1e2,1e3,3e3``, AT, an untrained teacher: only
the time matters) runs twice per round through the CLI, each time into a fresh folder:

- ``--jobs 2 --workers 1``: two worker processes, one torch thread each;
- ``--ray --workers 1``: a Ray started for the sweep on this machine (as many CPUs as the machine
  has), each cell a task with ``num_cpus=1``, the teacher put into the object store once.

Both wall times include the command's start (Python, torch, loading the teacher and data); the Ray
one also starts and stops Ray. Rounds alternate the order. The target of issue 24: Ray at most
1.3× the time of ``--jobs 2`` on a 2-core machine. Prints both times and the ratio last; writes
``--results`` (JSON). From the checkout's root:

    python benchmarks/sweep_overhead.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_teacher(path: Path, arch: str) -> Path:
    """An untrained teacher for the digits (10 classes, 16×16): the sweep's time does not depend on its weights."""
    import torch

    from compressor.models.checkpoint import save_checkpoint
    from compressor.models.spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec.for_arch(arch, 10, class_names=[str(i) for i in range(10)], input_size=(3, 16, 16))
    save_checkpoint(path, spec.build(), spec)
    return path


def sweep_seconds(teacher: Path, out: Path, engine: list[str], args) -> float:
    cmd = [sys.executable, "-m", "cli", "sweep", "--teacher", str(teacher), "--data", "digits", "--preset", "demo",
           "--grid", "beta=0,1e2,1e3,3e3", "--method", "at", "--student", args.student, "--epochs", str(args.epochs),
           "--device", "cpu", "--workers", "1", "--out", str(out), "--json", *engine]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(engine)} sweep failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    if result["failed"] or any(c["n"] != 1 for c in result["cells"]):
        raise SystemExit(f"error: {' '.join(engine)} sweep did not finish every cell: {result['failed']}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="pairs of sweeps (the order alternates)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per cell")
    ap.add_argument("--teacher", default="wrn-16-2")
    ap.add_argument("--student", default="wrn-16-1")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "sweep_overhead.json")
    args = ap.parse_args(argv)
    engines = {"jobs2": ["--jobs", "2"], "ray": ["--ray"]}
    times: dict[str, list[float]] = {k: [] for k in engines}
    work = Path(tempfile.mkdtemp(prefix="atc-sweep-overhead-"))
    try:
        teacher = make_teacher(work / "teacher.pt", args.teacher)
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                times[name].append(sweep_seconds(teacher, work / f"{name}-{r}", engines[name], args))
                print(f"round {r + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ray"] / med["jobs2"]
    import ray
    import torch

    result = {"benchmark": "sweep_overhead", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(["python", "benchmarks/sweep_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
              "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": None},
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
              "sweep": {"cells": 4, "data": "digits", "teacher": args.teacher, "student": args.student, "epochs": args.epochs,
                        "method": "at", "workers": 1},
              "seconds": times, "median_seconds": med, "ray_over_jobs2": ratio, "target": 1.3}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    print(f"summary: 4-cell digits sweep, --jobs 2 {med['jobs2']:.1f} s, --ray {med['ray']:.1f} s, "
          f"ratio {ratio:.2f} (target ≤ 1.3) on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
