"""Accuracy with and without the speed features: short distillations over several seeds, same teacher and epochs.

    python benchmarks/speed_parity.py --data CIFAR_DIR                      # the GPU run: 3 seeds x 15 epochs each way
    python benchmarks/speed_parity.py --data CIFAR_DIR --teacher runs/wrn-16-2.pt   # with a teacher trained before

(1) plain: fp32, NCHW, eager step, no CUDA graph, cuDNN autotuning off; (2) fast: ``--precision auto``
(bf16 on CUDA), channels_last, the whole step captured as a CUDA graph, cuDNN autotuning. Both
distil ``--student`` (WRN-16-1) from the teacher (WRN-16-2) with AT+KD, once per seed, and print the
final test top-1 of each run, then mean ± standard deviation over the seeds for each setting. The
check passes when the fast mean lies within the seed spread (lowest to highest top-1) of the plain
runs; the 0.5-point tolerance of the first acceptance is reported next to it. Without ``--teacher``
a WRN-16-2 teacher is trained first (``--teacher-epochs``, fast settings, seed 0) and saved in
``--out``. On a CPU the fast run differs only by channels_last (no bf16, no CUDA graph). Writes
JSON next to the printout (``--out``/parity.json).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import fileio  # noqa: E402
from compressor.config import load_config  # noqa: E402
from compressor.device import Speed, pick_device
from compressor.distill.loop import FitOptions, fit, objective_from
from compressor.distill.runtime import Teacher
from compressor.events import Reporter  # noqa: E402
from compressor.load import load_data, normalization
from compressor.models import create_model  # noqa: E402
from compressor.models.checkpoint import load_model
from compressor.pair import find_pairs
from compressor.profiling.latency import environment


class Printer(Reporter):
    def info(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def done(self, summary: str = "") -> None:
        if summary:
            print(f"  {summary}", flush=True)


def spread(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def teacher_for(args, cfg, data, dev):
    """The teacher to distil from: ``--teacher``, or a WRN-16-2 trained here (fast settings, seed 0)."""
    if args.teacher:
        teacher, spec, _ = load_model(args.teacher)
        return teacher, normalization(spec, data), spec.name
    path = args.out / "teacher"
    tcfg = load_config(args.preset, {"train": {"epochs": args.teacher_epochs, "batch_size": args.batch_size, "seed": 0},
                                     "data": {"train_subset": args.train_subset}})
    torch.manual_seed(0)
    teacher = create_model(args.teacher_arch, data.num_classes)
    mean, std = data.channel_stats()
    print(f"teacher: training {args.teacher_arch} for {args.teacher_epochs} epoch(s)", flush=True)
    r = fit(teacher, data, tcfg, path, mean, std, objective=objective_from(tcfg, "none"), device=dev, reporter=Printer(),
            options=FitOptions(tag="teacher", speed=Speed()))
    print(f"teacher: {args.teacher_arch} test top-1 {r.final['test_top1']:.2f}%", flush=True)
    return teacher.eval(), (mean, std), args.teacher_arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 folder (torchvision or ImageFolder train/+test/)")
    ap.add_argument("--teacher", help="trained teacher (atc checkpoint); default: train --teacher-arch first")
    ap.add_argument("--teacher-arch", default="wrn-16-2")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student", default="wrn-16-1")
    ap.add_argument("--preset", default="cifar")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, each run plain and fast")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tolerance", type=float, default=0.5, help="the first acceptance's largest top-1 difference, points (reported)")
    ap.add_argument("--out", type=Path, default=Path("runs/speed_parity"))
    args = ap.parse_args()

    dev = pick_device(args.device)
    base = load_config(args.preset, {"train": {"epochs": args.epochs, "batch_size": args.batch_size},
                                     "data": {"train_subset": args.train_subset}})
    data = load_data(args.data, base, reporter=Printer(), device=dev)
    teacher, (mean, std), teacher_name = teacher_for(args, base, data, dev)
    runs = {"plain": Speed(precision="fp32", channels_last=False, cudnn_benchmark=False, cuda_graphs=False),
            "fast": Speed(precision="auto", channels_last=True, cuda_graphs=None)}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for seed in range(args.seeds):
        cfg = load_config(args.preset, {"train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed},
                                        "data": {"train_subset": args.train_subset}})
        for name, speed in runs.items():
            torch.backends.cudnn.benchmark = False  # fit turns it on for the fast run only
            torch.manual_seed(seed)
            student = create_model(args.student, data.num_classes)
            t = copy.deepcopy(teacher)
            pairs = find_pairs(student, t, torch.zeros(1, *data.input_size), cfg.distill.at_layers)
            print(f"{name}, seed {seed}: {speed}", flush=True)
            began = time.perf_counter()
            r = fit(student, data, cfg, args.out / f"{name}-seed{seed}", mean, std, Teacher(t, pairs), objective_from(cfg, "at+kd"),
                    dev, Printer(), FitOptions(tag=f"{name} seed {seed}", speed=speed))
            results[name].append({"seed": seed, "top1": r.final["test_top1"], "train_seconds": r.seconds,
                                  "images_per_s": r.final.get("images_per_s"), "wall_seconds": time.perf_counter() - began})
    stats = {name: spread([r["top1"] for r in rs]) for name, rs in results.items()}
    plain, fast = stats["plain"], stats["fast"]
    diff = fast["mean"] - plain["mean"]
    within = plain["min"] <= fast["mean"] <= plain["max"]
    print()
    print("| run | setup | test top-1 % per seed | mean ± std | training s (mean) |")
    print("|---|---|---|---|---|")
    for name, speed in runs.items():
        rs, st = results[name], stats[name]
        per_seed = ", ".join(format(r["top1"], ".2f") for r in rs)
        print(f"| {name} | {speed.precision}, channels_last={speed.channels_last}, cuda_graphs={speed.cuda_graphs} | "
              f"{per_seed} | {st['mean']:.2f} ± {st['std']:.2f} | "
              f"{statistics.fmean(r['train_seconds'] for r in rs):.1f} |")
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    fileio.write_json(args.out / "parity.json", {"teacher": teacher_name, "student": args.student, "epochs": args.epochs,
                                                 "seeds": args.seeds, "data": data.name, "device": device, "runs": results,
                                                 "stats": stats, "difference": diff, "within_seed_spread": within,
                                                 "tolerance": args.tolerance, "within_tolerance": abs(diff) <= args.tolerance,
                                                 "command": " ".join(["python"] + sys.argv), "environment": environment()})
    print(f"parity: plain {plain['mean']:.2f} ± {plain['std']:.2f}% vs fast {fast['mean']:.2f} ± {fast['std']:.2f}% top-1 over "
          f"{args.seeds} seeds on {device}, difference {diff:+.2f} points; fast mean {'within' if within else 'OUTSIDE'} the plain "
          f"runs' seed spread {plain['min']:.2f}-{plain['max']:.2f} (|difference| {'<=' if abs(diff) <= args.tolerance else '>'} "
          f"{args.tolerance}): {'PASS' if within else 'FAIL'}; wrote {args.out / 'parity.json'}")
    sys.exit(0 if within else 1)


if __name__ == "__main__":
    main()
