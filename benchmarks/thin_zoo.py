"""Derive a half-width, one-block-per-stage student from torchvision classifiers atc has no rules for.

    python benchmarks/thin_zoo.py [--size 64] [--width 0.5] [--blocks 1]

For each model: Torch-Pruning thinning plus block removal, the teacher's surviving weights
inherited, a forward pass, params and fvcore GMACs before and after, and ONNX parity of the
student. Untrained weights: what is checked is that the derivation works, not accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from compressor.derive.candidates import derived_candidate
from compressor.derive.thinning import inherit
from compressor.export.onnx import check_parity, to_onnx
from compressor.models.spec import ModelSpec
from compressor.profiling.counts import count_macs, count_params

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "vgg11_bn", "regnet_x_400mf",
          "regnet_y_400mf", "resnet18", "resnet50")


def thin(name: str, size: int, width: float, blocks: int, folder: Path) -> str:
    torch.manual_seed(0)
    shape = (3, size, size)
    spec = ModelSpec.for_arch(name, 10, input_size=shape)
    teacher = spec.build().eval()
    cand = derived_candidate(spec, teacher, width, max_blocks=blocks)
    student = inherit(teacher, cand.spec.plan).eval()
    pt, ps = count_params(teacher)["total"], count_params(student)["total"]
    mt, ms = count_macs(teacher, shape).gmacs, count_macs(student, shape).gmacs
    parity = check_parity(student, to_onnx(student, shape, folder / f"{name}.onnx"), shape)
    return (f"| {name} | {pt:,} → {ps:,} ({pt / ps:.2f}×) | {mt:.4f} → {ms:.4f} ({mt / ms:.2f}×) "
            f"| {len(cand.spec.plan.removed_blocks)} | {parity.worst:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--blocks", type=int, default=1, help="at most this many repeated blocks per stage")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    print(f"width {args.width}, ≤ {args.blocks} block(s) per stage, input 3x{args.size}x{args.size}, 10 classes\n")
    print("| model | params | GMACs | blocks removed | ONNX max abs diff | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            began = time.perf_counter()
            try:
                row = thin(name, args.size, args.width, args.blocks, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one failing model must not hide the others
                row = f"| {name} | failed: {type(exc).__name__}: {exc} | | | |"
            print(f"{row} {time.perf_counter() - began:.0f} |", flush=True)


if __name__ == "__main__":
    main()
