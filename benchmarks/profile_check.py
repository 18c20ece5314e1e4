"""Params, fvcore GMACs and onnxruntime CPU batch-1 latency of zoo models: the README's table.

    python benchmarks/profile_check.py [--threads 2] [--out runs/profile_check.json]

Prints a Markdown table, then a one-line summary; writes the same data as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor import fileio
from compressor.models import create_model
from compressor.profiling.counts import count_macs, count_params
from compressor.profiling.latency import Timing, environment, measure_latency

MODELS = [("wrn-16-1", 10, 32), ("wrn-16-2", 10, 32), ("wrn-40-1", 10, 32), ("wrn-40-2", 10, 32), ("wrn-40-4", 10, 32),
          ("resnet20", 10, 32), ("resnet56", 10, 32), ("resnet18", 1000, 224), ("mobilenet_v2", 1000, 224), ("resnet50", 1000, 224)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per model")
    ap.add_argument("--out", type=Path, default=Path("runs/profile_check.json"))
    args = ap.parse_args()
    rows = []
    print("| model | input | params | GMACs | ORT CPU b1 median ms | CV |")
    print("|---|---|---|---|---|---|")
    for name, classes, size in MODELS:
        model = create_model(name, classes).eval()
        shape = (3, size, size)
        lat = measure_latency(model, shape, "ort-cpu", 1, args.threads, Timing(min_time_s=args.min_time))
        row = {"model": name, "input": f"3x{size}x{size}", "classes": classes, "params": count_params(model)["total"],
               "gmacs": count_macs(model, shape).gmacs, "ort_cpu_b1_median_ms": lat.median_ms, "cv": lat.cv, "threads": lat.threads}
        rows.append(row)
        print(f"| {name} | {row['input']} | {row['params']:,} | {row['gmacs']:.4f} | {lat.median_ms:.3f} | {100 * lat.cv:.1f}% |", flush=True)
    env = environment()
    fileio.write_json(args.out, {"rows": rows, "environment": env})
    print(f"profile_check: {len(rows)} models, {env['cpu']} ({env['cores']} cores), threads {rows[0]['threads']}, "
          f"torch {env['torch']}, onnxruntime {env['onnxruntime']}; JSON in {args.out}")


if __name__ == "__main__":
    main()
