"""Every atc command once, on real CIFAR-10, on a CUDA GPU, with a small budget; every output checked.

    python benchmarks/gpu_smoke.py --data .device-kit/cifar10 --out runs/smoke.json

Steps (each one ``python -m cli …`` in a subprocess with its own timeout): train a WRN-16-2 teacher,
derive its students, a compress dry run, compress WRN-16-1 with AT+KD and INT8, attention maps, a
two-cell β sweep, profile, export and report. A failed step does not stop the steps that do not
need its output; those that do are marked skipped. The JSON (written atomically) holds the device
and versions, the command, every step's command, seconds, checks and error, and the accuracies of
teacher, student and INT8 student, and what the teacher's and the student's training steps ran as
(``cuda_graphs``: captured with the number of captures, off with why, failed with the error; on
CUDA anything but one capture fails the step). Exit code 0 when every step passed, 1 otherwise, 2 when the
script cannot run here (no CUDA GPU, no data). The last line printed is a one-line summary.

It talks to atc only through its command line and the files atc writes. ``--device cpu`` (for the
tests) runs the same sequence on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ATC = [sys.executable, "-m", "cli"]
KIT_DATA = Path(".device-kit") / "cifar10"
PARITY_ATOL = 1e-4
TARGET_SECONDS = 240  # the whole run on one H100 (docs/benchmarks.md); over it is noted, not failed
STDERR_TAIL = 15
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SmokeError(Exception):
    """The script cannot run here (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Pure checks over what atc wrote: each returns {check name: value} and a list of failures.


def check_report(report: dict[str, Any], min_top1: float, *, int8: bool = True, atol: float = PARITY_ATOL,
                 int8_drop: float = 10.0) -> tuple[dict[str, Any], list[str]]:
    """Checks of a compress ``report.json``: one student with top-1 above ``min_top1``, latency
    figures, ONNX parity within ``atol`` at every batch size and (``int8``) an INT8 entry whose top-1
    is at most ``int8_drop`` points below the FP32 ONNX model's, which itself agrees with torch's."""
    checks: dict[str, Any] = {}
    fails: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            fails.append(message)

    teacher = report.get("teacher") or {}
    students = report.get("students")
    checks["teacher_top1"] = teacher.get("top1")
    need(_number(teacher.get("top1")), "report.json: teacher.top1 missing")
    need(_positive(teacher.get("latency_ms")), f"report.json: teacher.latency_ms is {teacher.get('latency_ms')!r}, not a positive number")
    if not isinstance(students, list) or not students:
        fails.append("report.json: no students")
        return checks, fails
    checks["students"] = len(students)
    s = students[0]
    checks["student"] = s.get("name")
    checks["student_top1"] = s.get("top1")
    if not _number(s.get("top1")):
        fails.append("report.json: students[0].top1 missing")
    elif not s["top1"] > min_top1:
        fails.append(f"report.json: student top-1 {s['top1']:.2f}% is not above {min_top1:.2f}%")
    for key in ("latency_ms", "latency_speedup"):
        checks[key] = s.get(key)
        need(_positive(s.get(key)), f"report.json: students[0].{key} is {s.get(key)!r}, not a positive number")
    spread = s.get("latency_speedup_spread")
    need(isinstance(spread, list) and len(spread) == 2 and all(_positive(v) for v in spread),
         f"report.json: students[0].latency_speedup_spread is {spread!r}, not two positive numbers")
    parity = s.get("onnx_parity_max_abs_diff")
    if not isinstance(parity, dict) or not parity or not all(_number(v) for v in parity.values()):
        fails.append(f"report.json: students[0].onnx_parity_max_abs_diff is {parity!r}, not a batch size → difference map")
    else:
        checks["onnx_parity_max_abs_diff"] = max(parity.values())
        need(max(parity.values()) < atol, f"report.json: ONNX parity {max(parity.values()):.2e} is not below {atol:g}")
    need(bool(s.get("attention_pairs")), "report.json: students[0].attention_pairs is empty")
    if int8:
        q = s.get("int8")
        if not isinstance(q, dict):
            fails.append("report.json: students[0].int8 missing (compress ran with --int8)")
        else:
            checks["int8_top1"] = q.get("top1_int8")
            checks["int8_speedup"] = q.get("speedup")
            need(_number(q.get("top1_int8")), "report.json: int8.top1_int8 missing")
            need(_positive(q.get("speedup")), f"report.json: int8.speedup is {q.get('speedup')!r}, not a positive number")
            need(_positive(q.get("latency_ms")), f"report.json: int8.latency_ms is {q.get('latency_ms')!r}, not a positive number")
            fp32, i8 = q.get("top1_fp32"), q.get("top1_int8")
            if _number(fp32) and _number(i8) and _number(s.get("top1")):
                # one test image's worth of slack, so that a single near-tie flipping on tiny test sets is no failure
                image = 100.0 * 1.01 / max(int((report.get("data") or {}).get("test") or 1), 1)
                need(abs(fp32 - s["top1"]) <= max(2.0, image),
                     f"report.json: onnxruntime FP32 top-1 {fp32:.2f}% disagrees with torch's {s['top1']:.2f}% by more than 2 points")
                need(fp32 - i8 <= max(int8_drop, image), f"report.json: INT8 top-1 {i8:.2f}% is more than {int8_drop:g} points below FP32 {fp32:.2f}%")
            elif not _number(fp32):
                fails.append("report.json: int8.top1_fp32 missing")
    return checks, fails


def graph_failures(graphs: dict[str, Any] | None, device: str, what: str) -> list[str]:
    """On CUDA the training step must have run as one CUDA graph captured once; elsewhere it only has to say
    what it ran as."""
    if not graphs or graphs.get("state") is None:
        return [f"{what} does not say whether it ran as a CUDA graph"]
    if device != "cuda":
        return []
    if graphs["state"] != "captured":
        return [f"{what} did not run as a CUDA graph ({graphs['state']}: {graphs.get('why') or 'no reason given'})"]
    if graphs.get("captures") != 1:
        return [f"{what} was captured {graphs.get('captures')} times, not once"]
    return []


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return False
    if len(head) < 24 or not head.startswith(PNG_MAGIC):
        return False
    width, height = struct.unpack(">II", head[16:24])
    return width > 0 and height > 0


def last_jsonl(path: Path) -> dict[str, Any] | None:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None


def count_classes(data: Path) -> int:
    train = data / "train"
    n = sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0
    return n or 10


# ---------------------------------------------------------------------------------------------
# Running the steps


class Step:
    """One atc command: its arguments, timeout, the steps it needs, and a check over its result."""

    def __init__(self, name: str, args: list[str], timeout: int, check: Callable[[subprocess.CompletedProcess], tuple[dict, list[str]]],
                 needs: tuple[str, ...] = ()):
        self.name, self.args, self.timeout, self.check, self.needs = name, args, timeout, check, needs


def run_step(step: Step, index: int, total: int, failed: set[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = ATC + step.args
    record: dict[str, Any] = {"name": step.name, "cmd": shlex.join(["python", "-m", "cli", *step.args]), "seconds": 0.0,
                              "ok": False, "returncode": None, "checks": {}, "error": None}
    blocked = [n for n in step.needs if n in failed]
    if blocked:
        record["error"] = f"skipped: needs the output of {', '.join(blocked)}, which failed"
        failed.add(step.name)
        _say(f"[{index}/{total}] {step.name}: skipped ({', '.join(blocked)} failed)")
        return record
    _say(f"[{index}/{total}] {step.name}: {record['cmd']}")
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout)
    except subprocess.TimeoutExpired as exc:
        record["seconds"] = round(time.perf_counter() - began, 2)
        record["error"] = f"timed out after {step.timeout} s" + _tail(_text(exc.stderr), "; stderr: ")
        failed.add(step.name)
        _say(f"[{index}/{total}] {step.name}: FAILED ({record['error'].splitlines()[0]})")
        return record
    record["seconds"] = round(time.perf_counter() - began, 2)
    record["returncode"] = proc.returncode
    errors: list[str] = []
    if proc.returncode != 0:
        errors.append(f"exit code {proc.returncode}")
    else:
        try:
            checks, errors = step.check(proc)
            record["checks"] = checks
        except Exception as exc:  # noqa: BLE001  (a check that trips over unexpected output is a failed step, not a crash)
            errors = [f"checking the output failed: {type(exc).__name__}: {exc}"]
    if errors:
        record["error"] = "; ".join(errors) + _tail(proc.stderr, "; stderr: ")
        failed.add(step.name)
    record["ok"] = not errors
    _say(f"[{index}/{total}] {step.name}: {'ok' if record['ok'] else 'FAILED: ' + '; '.join(errors)} ({record['seconds']:.1f} s)")
    return record


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")


def _tail(text: str, prefix: str) -> str:
    lines = [ln.rstrip() for ln in (text or "").splitlines() if ln.strip()]
    return prefix + "\n".join(lines[-STDERR_TAIL:]) if lines else ""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _json_stdout(proc: subprocess.CompletedProcess) -> Any:
    return json.loads(proc.stdout)


def build_steps(a: argparse.Namespace, data: Path, work: Path, results: dict[str, Any]) -> list[Step]:
    dev, d = a.device, str(data)
    teacher, comp = work / "teacher.pt", work / "compress"
    student = comp / "student.pt"
    min_top1 = a.min_top1
    subset = ["--train-subset", str(a.train_subset)]
    runtimes = "torch-cuda,ort-cpu" if dev == "cuda" else "torch-cpu,ort-cpu"
    batch_sizes = "1,128" if dev == "cuda" else "1,8"  # batch 128 in torch on a small CPU takes ~15 s of the test

    def train_check(proc):
        checks, fails = {"checkpoint_bytes": teacher.stat().st_size if teacher.is_file() else 0}, []
        if not teacher.is_file():
            fails.append(f"{teacher} was not written")
        last = last_jsonl(work / "teacher.pt.state" / "metrics.jsonl")
        top1 = last.get("test_top1") if last else None
        if top1 is None:  # the summary line on stderr: "saved …: wrn-16-2, test top-1 41.20% after 2 epochs"
            m = re.search(r"test top-1 ([0-9.]+)%", proc.stderr)
            top1 = float(m.group(1)) if m else None
        if last:
            checks.update(epochs=last.get("epoch"), images_per_s=last.get("images_per_s"), train_loss=last.get("train_loss"))
            if last.get("epoch") != a.epochs:
                fails.append(f"metrics.jsonl ends at epoch {last.get('epoch')}, not {a.epochs}")
            graphs = {"state": last.get("cuda_graphs"), "captures": last.get("cuda_graph_captures")}
            checks["cuda_graphs"] = results["teacher_cuda_graphs"] = graphs
            fails += graph_failures(graphs, dev, "the teacher's training step (metrics.jsonl)")
        checks["top1"] = results["teacher"] = top1
        if top1 is None:
            fails.append("no test top-1 in teacher.pt.state/metrics.jsonl or on stderr")
        elif not top1 > min_top1:
            fails.append(f"teacher top-1 {top1:.2f}% is not above {min_top1:.2f}%")
        flat = " ".join(proc.stderr.split())
        checks["trained_on"] = dev if f" on {dev}" in flat else None
        if checks["trained_on"] is None:
            fails.append(f"stderr does not say that training ran on {dev}")
        return checks, fails

    def derive_check(proc):
        ladder = _json_stdout(proc)
        names = [c.get("name") for c in ladder] if isinstance(ladder, list) else []
        fails = [] if names else ["derive --json printed no candidates"]
        if isinstance(ladder, list) and not all(_positive(c.get("params")) and _positive(c.get("gmacs")) and _positive(c.get("mac_ratio"))
                                                 for c in ladder):
            fails.append("a candidate lacks params, gmacs or mac_ratio")
        return {"candidates": names}, fails

    def dry_run_check(proc):
        pairs = [ln.split("AT pair", 1)[1].strip() for ln in proc.stderr.splitlines() if "AT pair" in ln]
        fails = [] if pairs else ["no 'AT pair' lines on stderr"]
        if "wrn-16-1" not in proc.stderr:
            fails.append("the dry run does not name the student wrn-16-1")
        if comp.exists():
            fails.append(f"the dry run wrote {comp}")
        return {"at_pairs": pairs}, fails

    def compress_check(proc):
        path = comp / "report.json"
        if not path.is_file():
            return {}, [f"{path} was not written"]
        report = json.loads(path.read_text())
        checks, fails = check_report(report, min_top1)
        for name in ("student.pt", "student.onnx", "report.md", "tradeoff.png", "metrics.jsonl", "curves.png"):
            if not (comp / name).is_file():
                fails.append(f"{comp / name} missing")
        for png in ("tradeoff.png", "curves.png"):
            if (comp / png).is_file() and not is_png(comp / png):
                fails.append(f"{comp / png} is not a PNG image")
        q = ((report.get("students") or [{}])[0]).get("int8") or {}
        if q.get("path") and not (comp / q["path"]).is_file():
            fails.append(f"the INT8 model {comp / q['path']} missing")
        results["student"] = checks.get("student_top1")
        results["int8"] = checks.get("int8_top1")
        graphs = (((report.get("students") or [{}])[0]).get("distill") or {}).get("cuda_graphs")
        checks["cuda_graphs"] = results["student_cuda_graphs"] = graphs
        fails += graph_failures(graphs, dev, "the student's training step (report.json distill.cuda_graphs)")
        results["teacher_in_compress"] = checks.get("teacher_top1")
        return checks, fails

    def attention_check(proc):
        png = work / "maps.png"
        fails = [] if is_png(png) else [f"{png} missing or not a PNG"]
        out = _json_stdout(proc)
        stages = out.get("stages") or []
        if not stages:
            fails.append("attention --json lists no stages")
        dist = [s.get("at_distance") for s in stages]
        if not all(_number(v) and v >= 0 for v in dist):
            fails.append(f"AT distances {dist} are not all finite and ≥ 0")
        return {"png_bytes": png.stat().st_size if png.is_file() else 0, "stages": len(stages), "at_distance": dist,
                "correlation": [s.get("correlation") for s in stages]}, fails

    def sweep_check(proc):
        path = work / "sweep" / "sweep.json"
        if not path.is_file():
            return {}, [f"{path} was not written"]
        sweep = json.loads(path.read_text())
        cells = sweep.get("cells") or []
        fails = [] if len(cells) == 2 else [f"sweep.json has {len(cells)} cells, not 2"]
        means = [c.get("mean") for c in cells]
        if not all(_number(m) for m in means):
            fails.append(f"cell means {means} are not all numbers")
        for name in ("sweep.md", "sweep.png"):
            if not (work / "sweep" / name).is_file():
                fails.append(f"{work / 'sweep' / name} missing")
        return {"cells": len(cells), "top1_means": means, "params": [c.get("params") for c in cells]}, fails

    def profile_check(proc):
        out = _json_stdout(proc)
        lat = out.get("latency") or []
        seen = {l.get("runtime") for l in lat}
        fails = [f"no latency for {rt}" for rt in runtimes.split(",") if rt not in seen]
        for l in lat:
            if not (_positive(l.get("median_ms")) and _positive(l.get("images_per_s"))):
                fails.append(f"latency of {l.get('runtime')} batch {l.get('batch_size')} lacks median_ms/images_per_s")
        if not _positive(out.get("gmacs")):
            fails.append("profile --json has no gmacs")
        return {"gmacs": out.get("gmacs"), "params": (out.get("params") or {}).get("total"),
                "latency_ms": {f"{l.get('runtime')}/b{l.get('batch_size')}": l.get("median_ms") for l in lat},
                "gpu": (out.get("environment") or {}).get("gpu")}, fails

    def export_check(proc):
        onnx = work / "export" / "student.onnx"
        fails = [] if onnx.is_file() and onnx.stat().st_size > 0 else [f"{onnx} was not written"]
        text = " ".join(proc.stdout.split())
        diffs = {b: float(v) for b, v in re.findall(r"batch (\d+): ([0-9.]+(?:e[-+]?\d+)?)", text)}
        if not diffs:
            fails.append("export printed no parity figures (max |onnxruntime - torch| batch N: …)")
        elif max(diffs.values()) >= PARITY_ATOL:
            fails.append(f"ONNX parity {max(diffs.values()):.2e} is not below {PARITY_ATOL:g}")
        return {"onnx_bytes": onnx.stat().st_size if onnx.is_file() else 0, "parity_max_abs_diff": diffs}, fails

    def report_check(proc):
        report = _json_stdout(proc)
        checks, fails = check_report(report, min_top1)
        if not (comp / "report.md").is_file():
            fails.append(f"{comp / 'report.md'} missing")
        return {"students": checks.get("students"), "student_top1": checks.get("student_top1")}, fails

    dev_flag = ["--device", dev]
    return [
        Step("train", ["train", "--arch", "wrn-16-2", "--data", d, "--preset", "cifar", "--epochs", str(a.epochs), *subset,
                       "--out", str(teacher), *dev_flag], 300, train_check),
        Step("derive", ["derive", "--teacher", str(teacher), "--json"], 120, derive_check, needs=("train",)),
        Step("compress-dry-run", ["compress", "--teacher", str(teacher), "--data", d, "--preset", "cifar", "--student", "wrn-16-1",
                                  "--dry-run"], 180, dry_run_check, needs=("train",)),
        Step("compress", ["compress", "--teacher", str(teacher), "--data", d, "--preset", "cifar", "--student", "wrn-16-1",
                          "--method", "at+kd", "--epochs", str(a.epochs), *subset, "--int8", "--out", str(comp), *dev_flag],
             600, compress_check, needs=("train",)),
        Step("attention", ["attention", "--teacher", str(teacher), "--student-checkpoint", str(student), "--data", d, "--preset", "cifar",
                           "--out", str(work / "maps.png"), "--images", "8", "--json", *dev_flag], 180, attention_check,
             needs=("train", "compress")),
        Step("sweep", ["sweep", "--teacher", str(teacher), "--data", d, "--preset", "cifar", "--student", "wrn-16-1",
                       "--grid", "beta=0,1e3", "--epochs", "1", *subset, "--out", str(work / "sweep"), *dev_flag], 400,
             sweep_check, needs=("train",)),
        Step("profile", ["profile", str(student), "--runtimes", runtimes, "--batch-sizes", batch_sizes, "--min-time", "0.3", "--json"],
             180, profile_check, needs=("compress",)),
        Step("export", ["export", str(student), "--out", str(work / "export" / "student.onnx")], 180, export_check,
             needs=("compress",)),
        Step("report", ["report", str(comp), "--json"], 120, report_check, needs=("compress",)),
    ]


# ---------------------------------------------------------------------------------------------
# Device and versions


def device_info(dev: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"kind": dev, "gpu": None, "driver": None, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": None, "python": platform.python_version(), "onnxruntime": None}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.backends.cudnn.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    if dev == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                     check=False, capture_output=True, text=True, timeout=30)
                first = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
                if "," in first:
                    name, driver = (p.strip() for p in first.rsplit(",", 1))
                    info["gpu"], info["driver"] = name or info["gpu"], driver or None
            except (OSError, subprocess.TimeoutExpired):
                pass
    return info


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help=f"CIFAR-10 folder (default: {KIT_DATA} when present)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for checkpoints and runs; must be empty or absent (default: a temporary folder, removed after a passing run)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default); cpu runs the sequence without a GPU, for tests")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the teacher and of the compress student (default 2)")
    ap.add_argument("--train-subset", type=int, default=10000, help="training images per run (default 10000; 0 = all 50,000)")
    ap.add_argument("--min-top1", type=float, default=None, help="top-1 %% that teacher and student must beat (default: chance, 100 / classes; the tests pass -1)")
    a = ap.parse_args(argv)
    if a.epochs < 1 or a.train_subset < 0:
        ap.error("--epochs must be ≥ 1 and --train-subset ≥ 0")
    return a


def find_data(given: Path | None) -> Path:
    if given is not None:
        if not (given / "train").is_dir():
            raise SmokeError(f"--data {given} has no train/ folder; pass the CIFAR-10 ImageFolder (train/ and test/ class folders)")
        return given.resolve()
    for base in (Path.cwd(), ROOT):
        if (base / KIT_DATA / "train").is_dir():
            return (base / KIT_DATA).resolve()
    raise SmokeError(f"no --data given and {KIT_DATA} is absent; run ../shared/device/prep, then on the GPU machine "
                     "bash .device-kit/run.sh python benchmarks/gpu_smoke.py --out FILE.json (see docs/benchmarks.md)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    command = shlex.join(["python", "benchmarks/gpu_smoke.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        if a.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise SmokeError("benchmarks/gpu_smoke.py needs a CUDA GPU and torch.cuda.is_available() is false here; "
                                 "run it on a GPU machine (see docs/benchmarks.md)")
        data = find_data(a.data)
        work = a.work.resolve() if a.work else Path(tempfile.mkdtemp(prefix="atc-gpu-smoke-"))
        if work.exists() and (not work.is_dir() or any(work.iterdir())) and a.work:
            raise SmokeError(f"--work {work} is not an empty folder; pass a new or empty one")
    except SmokeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.min_top1 is None:
        a.min_top1 = 100.0 / count_classes(data)
    work.mkdir(parents=True, exist_ok=True)
    out = a.out.resolve()
    env = {**os.environ, "MPLBACKEND": os.environ.get("MPLBACKEND", "Agg"), "PYTHONUNBUFFERED": "1"}
    device = device_info(a.device)
    _say(f"gpu_smoke: {device['gpu'] or 'cpu'}, torch {device['torch']}, CUDA {device['cuda']}; data {data}; work {work}")
    results: dict[str, Any] = {}
    failed: set[str] = set()
    began = time.perf_counter()
    steps = build_steps(a, data, work, results)
    records = [run_step(s, i, len(steps), failed, env) for i, s in enumerate(steps, 1)]
    total = round(time.perf_counter() - began, 1)
    passed = all(r["ok"] for r in records)
    payload = {
        "device": device, "command": command, "data": str(data), "work": str(work),
        "budget": {"epochs": a.epochs, "train_subset": a.train_subset, "sweep_epochs": 1, "min_top1": a.min_top1,
                   "target_seconds": TARGET_SECONDS},
        "steps": records,
        "accuracies": {"teacher": results.get("teacher"), "student": results.get("student"), "int8": results.get("int8")},
        # whether each training step ran as a CUDA graph, and how often it was captured (once per run on CUDA)
        "cuda_graphs": {"teacher": results.get("teacher_cuda_graphs"), "student": results.get("student_cuda_graphs")},
        "total_seconds": total, "passed": passed,
    }
    write_json_atomic(out, payload)
    if passed and a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not passed:
        _say(f"gpu_smoke: outputs kept in {work}; failed: {', '.join(r['name'] for r in records if not r['ok'])}")
    if a.device == "cuda" and total > TARGET_SECONDS:
        _say(f"gpu_smoke: note: {total:.0f} s is over the {TARGET_SECONDS} s this run should take on one H100")
    ok = sum(r["ok"] for r in records)
    print(f"gpu_smoke: {ok}/{len(records)} steps passed in {total:.0f} s on {device['gpu'] or 'cpu'} -> {out}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
