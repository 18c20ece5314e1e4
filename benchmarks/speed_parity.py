"""Accuracy with and without the speed features: two short distillations, same teacher, seed and epochs.

    python benchmarks/speed_parity.py --teacher runs/wrn-40-4.pt --data CIFAR_DIR --epochs 15

(1) plain: fp32, NCHW, eager, cuDNN autotuning off; (2) fast: ``--precision auto`` (bf16 on CUDA),
channels_last, torch.compile, cuDNN autotuning. Both train ``--student`` with AT+KD on the same
data path and print the final test top-1; the check passes when they differ by at most
``--tolerance`` points (0.5 by default, the issue's acceptance). Meant for a GPU: on the CPU the
fast run differs only by channels_last and compilation. Writes JSON next to the printout (--out).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import fileio  # noqa: E402
from compressor.pair import find_pairs
from compressor.models.checkpoint import load_model
from compressor.config import load_config  # noqa: E402
from compressor.device import Speed, pick_device
from compressor.distill.loop import Teacher, fit, objective_from
from compressor.events import Reporter  # noqa: E402
from compressor.models import create_model  # noqa: E402
from compressor.pipeline import load_data, normalization
from compressor.profiling.latency import environment


class Printer(Reporter):
    def info(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def done(self, summary: str = "") -> None:
        if summary:
            print(f"  {summary}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="trained teacher (atc checkpoint)")
    ap.add_argument("--data", required=True, help="CIFAR-10 folder (torchvision or ImageFolder train/+test/)")
    ap.add_argument("--student", default="wrn-16-2")
    ap.add_argument("--preset", default="cifar")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the fast run")
    ap.add_argument("--tolerance", type=float, default=0.5, help="largest allowed top-1 difference, points")
    ap.add_argument("--out", type=Path, default=Path("runs/speed_parity"))
    args = ap.parse_args()

    dev = pick_device(args.device)
    cfg = load_config(args.preset, {"train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed},
                                    "data": {"train_subset": args.train_subset}})
    teacher, t_spec, _ = load_model(args.teacher)
    data = load_data(args.data, cfg, reporter=Printer(), device=dev)
    mean, std = normalization(t_spec, data)
    runs = {"plain": Speed(precision="fp32", channels_last=False, compile=False, cudnn_benchmark=False),
            "fast": Speed(precision="auto", channels_last=True, compile=True, compile_backend=args.compile_backend)}
    results = {}
    for name, speed in runs.items():
        torch.backends.cudnn.benchmark = False  # fit turns it on for the fast run only
        torch.manual_seed(args.seed)
        student = create_model(args.student, data.num_classes)
        t = copy.deepcopy(teacher)
        pairs = find_pairs(student, t, torch.zeros(1, *data.input_size), cfg.distill.at_layers)
        print(f"{name}: {speed}", flush=True)
        began = time.perf_counter()
        r = fit(student, data, cfg, args.out / name, mean, std, Teacher(t, pairs), objective_from(cfg, "at+kd"), dev, Printer(),
                speed=speed, tag=name)
        results[name] = {"top1": r.final["test_top1"], "train_seconds": r.seconds, "compile_seconds": r.compile_seconds,
                         "wall_seconds": time.perf_counter() - began, "history": r.history}
    diff = results["fast"]["top1"] - results["plain"]["top1"]
    ok = abs(diff) <= args.tolerance
    print()
    print("| run | setup | test top-1 % | training s | compile s |")
    print("|---|---|---|---|---|")
    for name, speed in runs.items():
        r = results[name]
        print(f"| {name} | {speed.precision}, channels_last={speed.channels_last}, compile={speed.compile} | {r['top1']:.2f} | "
              f"{r['train_seconds']:.1f} | {r['compile_seconds']:.1f} |")
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    fileio.write_json(args.out / "parity.json", {"teacher": t_spec.name, "student": args.student, "epochs": args.epochs,
                                                 "seed": args.seed, "data": data.name, "device": device, "runs": results,
                                                 "difference": diff, "tolerance": args.tolerance, "pass": ok,
                                                 "command": " ".join(["python"] + sys.argv), "environment": environment()})
    print(f"parity: plain {results['plain']['top1']:.2f}% vs fast {results['fast']['top1']:.2f}% top-1 on {device}, "
          f"difference {diff:+.2f} points (tolerance {args.tolerance}): {'PASS' if ok else 'FAIL'}; wrote {args.out / 'parity.json'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
