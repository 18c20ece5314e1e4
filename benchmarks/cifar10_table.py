"""The paper's CIFAR-10 table, reproduced with atc's own commands.

For every teacher → student pair it trains the teacher once (``atc train``), then each student
alone, with KD, with AT and with AT+KD, and beside them with its rivals FitNet (hints), DKD and
AT+DKD (``atc compress --method …``, the same recipe, student and seeds) for several seeds, and
prints error % (median over seeds, with min–max), params, GMACs and the measured onnxruntime
CPU batch-1 latency speed-up. Finished cells are skipped when re-run; results go to
``OUT/table.json`` and ``OUT/table.md``.

The latency column is measured once per pair after all training is done (teacher and the
first seed's student interleaved in one process), so a re-run on an idle machine refreshes it
without retraining; the per-cell figures measured during training stay in the JSON.

    python benchmarks/cifar10_table.py --data DIR --out runs/cifar10_table \
        --pairs wrn-16-1:wrn-16-2 --seeds 3 --epochs 6 --teacher-epochs 10 --train-subset 10000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAIRS = "wrn-16-1:wrn-16-2,wrn-16-2:wrn-40-2,wrn-16-2:wrn-40-4,wrn-16-4:wrn-40-4"
METHODS = "none,kd,at,at+kd,fitnet,dkd,at+dkd"
LABELS = {"none": "student alone", "kd": "KD", "at": "AT", "at+kd": "AT+KD", "fitnet": "FitNet", "dkd": "DKD",
          "at+dkd": "AT+DKD", "fitnet+kd": "FitNet+KD", "fitnet+dkd": "FitNet+DKD"}
ATC = [sys.executable, "-m", "cli"]


def run(cmd: list[str]) -> None:
    print("+ atc " + " ".join(cmd), flush=True)
    subprocess.run(ATC + cmd, check=True)


def teacher_checkpoint(args, arch: str) -> Path:
    path = args.out / "teachers" / f"{arch}.pt"
    if not path.exists():
        resume = ["--resume"] if path.with_name(path.name + ".state").exists() else []
        run(["train", "--arch", arch, "--data", args.data, "--out", str(path), "--preset", "cifar", "--epochs", str(args.teacher_epochs),
             "--train-subset", str(args.teacher_train_subset), "--seed", "0", *resume])
    return path


def cell(args, teacher: Path, student: str, method: str, seed: int) -> dict:
    out = args.out / "cells" / f"{teacher.stem}__{student}__{method.replace('+', '_')}__s{seed}"
    report = out / "report.json"
    if not report.exists():
        flag = ["--resume"] if out.exists() else []
        run(["compress", "--teacher", str(teacher), "--data", args.data, "--out", str(out), "--preset", "cifar", "--student", student,
             "--method", method, "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), "--seed", str(seed),
             "--threads", str(args.threads), *flag])
    return json.loads(report.read_text())


def summarise(reports: list[dict]) -> dict:
    errors = [100 - r["students"][0]["top1"] for r in reports]
    s = reports[0]["students"][0]
    return {"error_median": statistics.median(errors), "error_min": min(errors), "error_max": max(errors), "errors": errors,
            "params": s["params"], "gmacs": s["gmacs"], "mac_ratio": s["mac_ratio"],
            "train_seconds": sum(r["students"][0]["train_seconds"] for r in reports),
            "cell_latency_speedups": [r["students"][0]["latency_speedup"] for r in reports]}


def pair_latency(teacher: Path, student: Path, threads: int, rounds: int) -> dict:
    """Teacher and student ONNX latency, interleaved; the speed-up is the median per-round ratio."""
    from compressor.models.checkpoint import load_model
    from compressor.profiling.latency import compare_latency

    t_model, t_spec, _ = load_model(teacher)
    s_model, _, _ = load_model(student)
    speed = compare_latency(t_model.eval(), s_model.eval(), tuple(t_spec.input_size), "ort-cpu", 1, threads, rounds=rounds)
    return {"speedup": speed.speedup, "spread": list(speed.spread), "teacher_ms": speed.teacher_ms,
            "student_ms": speed.student_ms, "rounds": rounds, "threads": speed.threads}


def markdown(table: dict, args) -> str:
    methods = args.methods.split(",")
    lines = [f"CIFAR-10 (JPEG q75), full 10,000-image test set. Students: {args.train_subset or 50000} training images, "
             f"{args.epochs} epochs; teacher: {args.teacher_train_subset or 50000} images, {args.teacher_epochs} epochs (seed 0). "
             f"SGD lr 0.1 ×0.2 at 30/60/80% of training, batch 128, seeds 0..{args.seeds - 1}; "
             "error % is the median over seeds with [min–max].", "",
             "| student ← teacher | teacher err % | " + " | ".join(LABELS.get(m, m) for m in methods) +
             " | params | GMACs (× fewer) | ORT CPU b1 speed-up |",
             "|---|---|" + "---|" * len(methods) + "---|---|---|"]
    for key, row in table.items():
        cells = [f"{row[m]['error_median']:.2f} [{row[m]['error_min']:.2f}–{row[m]['error_max']:.2f}]" if m in row else "–"
                 for m in methods]
        any_row = next(iter(v for k, v in row.items() if k in methods))
        lat = row["latency"]
        lines.append(f"| {key} | {row['teacher_error']:.2f} | " + " | ".join(cells) +
                     f" | {any_row['params']:,} | {any_row['gmacs']:.4f} ({any_row['mac_ratio']:.1f}×) "
                     f"| {lat['speedup']:.2f}× [{lat['spread'][0]:.2f}–{lat['spread'][1]:.2f}] |")
    lines += ["", f"Latency: onnxruntime CPU, batch 1, {lat['threads']} thread(s), teacher and student interleaved over "
              f"{lat['rounds']} rounds after training; median per-round ratio with [min–max]."]
    rivals = [m for m in methods if "fitnet" in m or "dkd" in m]
    if rivals:
        from compressor.config import load_config

        d = load_config("cifar", {"train": {"epochs": args.epochs}}).distill
        lines += ["", f"Rivals ({', '.join(LABELS.get(m, m) for m in rivals)}) with the `cifar` preset's settings: FitNet's hint "
                  f"at weight {d.fitnet_weight:g} on the middle group, jointly with CE (RepDistiller's setting), through a "
                  f"1×1 conv + BN regressor where channels differ; DKD α = {d.dkd_alpha:g}, β = {d.dkd_beta:g}, "
                  f"T = {d.dkd_temperature:g} (mdistiller's CIFAR values), its 20-epoch warm-up scaled with the schedule to "
                  f"{d.dkd_warmup_epochs} epoch{'s' if d.dkd_warmup_epochs != 1 else ''}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 folder (torchvision or ImageFolder layout)")
    ap.add_argument("--out", type=Path, default=Path("runs/cifar10_table"))
    ap.add_argument("--pairs", default=PAIRS, help="student:teacher,… (default: the four pairs of the issue)")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=200, help="student epochs (paper: 200)")
    ap.add_argument("--teacher-epochs", type=int, default=200)
    ap.add_argument("--train-subset", type=int, default=0, help="training images (0 = all 50,000)")
    ap.add_argument("--teacher-train-subset", type=int, default=None, help="teacher's training images (default: --train-subset)")
    ap.add_argument("--threads", type=int, default=1, help="threads for latency measurement")
    ap.add_argument("--latency-rounds", type=int, default=30, help="interleaved rounds of the per-pair latency measurement")
    args = ap.parse_args()
    if args.teacher_train_subset is None:
        args.teacher_train_subset = args.train_subset
    if shutil.which("atc") is None:
        print("note: the atc console script is not on PATH; running python -m cli", file=sys.stderr)
    began = time.time()
    table = {}
    for pair in args.pairs.split(","):
        student, teacher_arch = pair.split(":")
        teacher = teacher_checkpoint(args, teacher_arch)
        row: dict = {}
        for method in args.methods.split(","):
            reports = [cell(args, teacher, student, method, seed) for seed in range(args.seeds)]
            row[method] = summarise(reports)
            row["teacher_error"] = 100 - reports[0]["teacher"]["top1"]
        table[f"{student} ← {teacher_arch}"] = row
    for (key, row), pair in zip(table.items(), args.pairs.split(",")):
        print(f"measuring the latency of {key}", flush=True)
        teacher = args.out / "teachers" / f"{pair.split(':')[1]}.pt"
        student_ckpt = next((args.out / "cells").glob(f"{teacher.stem}__{pair.split(':')[0]}__*__s0/student.pt"))
        row["latency"] = pair_latency(teacher, student_ckpt, args.threads, args.latency_rounds)
    md = markdown(table, args)
    args.out.mkdir(parents=True, exist_ok=True)
    train_seconds = sum(v["train_seconds"] for row in table.values() for k, v in row.items() if k in args.methods.split(","))
    (args.out / "table.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table,
                                                      "student_train_seconds": train_seconds,
                                                      "wall_seconds_this_invocation": time.time() - began}, indent=2))
    (args.out / "table.md").write_text(md)
    print(md)
    print(f"students' training time, all cells: {train_seconds / 3600:.2f} h")
    for key, row in table.items():
        gaps = {m: row["none"]["error_median"] - row[m]["error_median"] for m in args.methods.split(",")
                if m != "none" and m in row and "none" in row}
        print(f"summary {key}: " + ", ".join(f"{m} {g:+.2f} pts vs alone" for m, g in gaps.items()))


if __name__ == "__main__":
    main()
