"""A teacher trained elsewhere with fixed normalisation statistics, scored by its own evaluation and by
atc: with ``--mean``/``--std`` atc gives the same top-1; without, it falls back to statistics measured
from the training images (and says so), and the top-1 moves.

The teacher is atc's ``resnet8x1`` trained by a plain PyTorch loop (not atc's) on the bundled digits
at 16x16 with mean 0.1307 and std 0.3081, saved as RepDistiller saves its checkpoints
(``{'epoch', 'model', 'accuracy'}``). atc's figures come from the code path ``atc compress`` scores
the teacher with (``load_teacher_and_data``, ``make_batches``, ``evaluate``).

    python benchmarks/teacher_normalisation.py --out runs/teacher_normalisation

prints a one-line summary last and writes ``teacher_normalisation.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import load_config  # noqa: E402
from compressor.data.open import load_digits  # noqa: E402
from compressor.distill.loop import make_batches  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.load import load_teacher_and_data  # noqa: E402
from compressor.models import create_model  # noqa: E402
from compressor.options import RunOptions  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def train_elsewhere(epochs: int, seed: int) -> tuple[nn.Module, float]:
    """Another project's loop: its own normalisation, its own evaluation."""
    digits = load_digits(16)
    torch.manual_seed(seed)
    model = create_model("resnet8x1", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = (digits.train_x.float() / 255 - MEAN) / STD
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(digits.train_y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), digits.train_y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = int((model((digits.test_x.float() / 255 - MEAN) / STD).argmax(1) == digits.test_y).sum())
    return model, 100.0 * correct / len(digits.test_y)


def atc_top1(path: Path, options: RunOptions) -> tuple[float, list[float], list[float]]:
    cfg = load_config("demo")
    loaded = load_teacher_and_data(path, "digits", cfg, options)
    _, test_b = make_batches(loaded.data, cfg, *loaded.mean_std, torch.device("cpu"))
    return evaluate(loaded.model, test_b, amp=False).top1, *loaded.mean_std


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/teacher_normalisation"))
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the teacher's own training")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    model, own = train_elsewhere(args.epochs, args.seed)
    path = args.out / f"ckpt_epoch_{args.epochs}.pth"
    torch.save({"epoch": args.epochs, "model": model.state_dict(), "accuracy": own}, path)
    given, _, _ = atc_top1(path, RunOptions(mean=(MEAN,), std=(STD,)))
    measured, m_mean, m_std = atc_top1(path, RunOptions())
    result = {"teacher": "resnet8x1", "data": "digits 16x16 (1,437 train / 360 test)", "trained_with": {"mean": MEAN, "std": STD},
              "epochs": args.epochs, "seed": args.seed, "own_top1": own, "atc_top1_with_mean_std": given,
              "atc_top1_measured_statistics": measured, "measured_mean": m_mean, "measured_std": m_std,
              "command": f"atc compress --teacher {path} --data digits --preset demo --mean {MEAN} --std {STD} ...",
              "device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (args.out / "teacher_normalisation.json").write_text(json.dumps(result, indent=2))
    print(f"teacher trained with mean {MEAN} std {STD}: own top-1 {own:.2f}%, atc with --mean/--std {given:.2f}%, "
          f"atc with statistics measured from the data (mean {m_mean[0]:.4f}, std {m_std[0]:.4f}) {measured:.2f}%")


if __name__ == "__main__":
    main()
