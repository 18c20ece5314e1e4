"""Training throughput of AT+KD distillation, WRN-40-4 → WRN-16-2 on CIFAR-sized images:
a reference loop against atc's loop, in one process, alternating.

(a) reference — the loop as the public AT code writes it: fp32, a torchvision-style dataset that
    turns each uint8 image into a PIL image and applies torchvision transforms (RandomCrop 32 with
    padding 4, RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader with 4 worker processes
    (pinned memory on CUDA), teacher and student in eager mode, the teacher's forward under
    ``torch.no_grad``, ``torch.optim.SGD`` with its defaults.
(b) atc — ``compressor.distill.train_one_epoch`` over ``DeviceBatches`` (the uint8 images uploaded
    once; crop, flip and normalisation on the device per batch) with ``Speed``: bf16 autocast on
    CUDA, channels_last, fused SGD, cuDNN autotuning, optionally ``--compile``.

(c) atc before — the same loop as it was before the sync-free step: forward hooks for the maps and a
    host read of every loss term and of the accuracy at every step (``float(t)``, ``int(t)``);
    kept here so that one run shows what removing the per-step synchronisation gained.
(d) the parts alone, each on one fixed device-resident batch: the teacher's forward (inference mode)
    and the student's training step with cross-entropy only (forward, backward, SGD), both with the
    same precision and memory format as (b), eager.
(e) the product path — what ``atc compress`` runs: ``compressor.distill.fit`` through the library,
    WRN-16-2 → WRN-16-1 AT+KD at batch 128 on random uint8 images for ``--product-epochs`` epochs;
    its rate is the last epoch's ``images_per_s`` from the metrics (the first epoch includes the
    CUDA graph warm-up and capture).

On CUDA (b) runs twice: as ``fit`` runs it (``atc``: the step captured as a CUDA graph where it
applies) and as the sync-free eager step (``atc_eager``); ``--no-cuda-graphs`` drops the captured
one. What ``atc`` and the product path actually ran as is read from the step's status after the
timing (``GraphStatus``: captured with the number of captures and replays, off with why, failed
with the error) and written to the JSON (``cuda_graphs``, ``product.cuda_graphs``), not assumed.

Both compute the same objective — 0.1·CE + 0.9·KD(T=4) + 1000·Σ AT over the three groups — which
is checked on one batch before timing. After ``--warmup`` steps of each, ``--rounds`` rounds
alternate ``--steps`` timed steps of (a) and of (b); images/s is the median over rounds. cuDNN
autotuning is on for both loops (the conservative choice: it only helps the reference).

Printed: both rates and their ratio, peak GPU memory of each loop, the work per image counted by
fvcore (teacher forward + student forward and backward, taken as 3 × forward; fvcore counts a
multiply-add as one flop, so GFLOPs = 2 × GMACs), the share of the GPU's dense bf16 peak that
atc's rate represents, and the wall time this rate gives for the paper's 200-epoch CIFAR schedule
(50,000 images per epoch, training steps only). A one-line summary comes last; the numbers are
also written as JSON (``--out``).

    python benchmarks/throughput.py --data ../shared/cifar10 --batch-size 512 --compile   # the GPU run
    python benchmarks/throughput.py                                                        # CPU: reduced sizes
    python benchmarks/throughput.py --teacher wrn-10-1 --student wrn-10-0.5 --batch-size 8 --steps 3 --warmup 1 \
        --rounds 1 --images 64 --product-images 64 --product-batch-size 16 --product-epochs 1     # a smoke run, seconds

Without ``--data`` the images are random uint8 (CIFAR's size and count on CUDA; 1,024 on the
CPU), which times the same arithmetic. On the CPU the defaults shrink (batch 32, 2 timed steps
per round, 2 rounds, 2 reference workers); the ratio is still printed, but a CPU has no bf16
peak to compare with and neither bf16 nor fusing helps there, so only the GPU numbers speak to
the speed-up this benchmark is about.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import fileio  # noqa: E402
from compressor.config import load_config  # noqa: E402
from compressor.data.images import Augment, DeviceBatches, ImageData
from compressor.data.open import open_dataset
from compressor.device import Speed, autocast, autocast_dtype, pick_device
from compressor.distill.loop import FitOptions, fit, make_optimizer, objective_from, train_one_epoch
from compressor.distill.losses import distillation_terms
from compressor.distill.runtime import Teacher, prepare_runtime
from compressor.distill.step import GraphStatus
from compressor.events import Reporter
from compressor.models import create_model  # noqa: E402
from compressor.pair import Taps, find_pairs
from compressor.profiling.counts import count_macs
from compressor.profiling.latency import environment

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (without sparsity).
BF16_PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.05, "L4": 121.0, "A10G": 70.0}
EPOCHS, CIFAR_TRAIN = 200, 50_000


def bf16_peak(name: str) -> float | None:
    for key, tflops in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return tflops
    return None


def synthetic(n: int, classes: int = 10, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return ImageData("random-uint8", x, y, x[:256], y[:256], [str(i) for i in range(classes)])


# --------------------------------------------------------------------------------------------
# (a) the reference loop


class RefCIFAR(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's item path: a uint8 H×W×C array → PIL image → transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.data, self.targets, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def ref_at(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def ref_at_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (ref_at(x) - ref_at(y)).pow(2).mean()


def ref_distillation(y: torch.Tensor, teacher_scores: torch.Tensor, labels: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    return F.kl_div(p, q, reduction="batchmean") * (T * T * alpha) + F.cross_entropy(y, labels) * (1.0 - alpha)


class RefObjective:
    """The reference's loss over a teacher and a student whose group outputs hooks keep."""

    def __init__(self, teacher, student, pairs, beta: float = 1000.0):
        self.teacher, self.student, self.beta, self.n_pairs = teacher, student, beta, len(pairs)
        self.maps: dict[str, torch.Tensor] = {}
        for model, side in ((teacher, "t"), (student, "s")):
            modules = dict(model.named_modules())
            for k, p in enumerate(pairs):
                name = p.teacher.module if side == "t" else p.student.module
                modules[name].register_forward_hook(lambda m, i, o, key=f"{side}{k}": self.maps.__setitem__(key, o))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y_t = self.teacher(x)
        y_s = self.student(x)
        at = sum(ref_at_loss(self.maps[f"s{k}"], self.maps[f"t{k}"]) for k in range(self.n_pairs))
        return ref_distillation(y_s, y_t, y, 4.0, 0.9) + self.beta * at


class ReferenceLoop:
    def __init__(self, teacher, student, pairs, data: ImageData, mean, std, batch: int, workers: int, device):
        import torchvision.transforms as T

        self.student, self.device = student.to(device).train(), device
        self.loss = RefObjective(teacher.to(device).eval(), self.student, pairs)
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        self.loader = torch.utils.data.DataLoader(RefCIFAR(data.train_x, data.train_y, transform), batch_size=batch, shuffle=True,
                                                  num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)
        self._stream = self._forever()

    def _forever(self):
        while True:  # a new iterator (and new worker processes) every epoch, as the reference does
            yield from self.loader

    def run(self, steps: int) -> None:
        for _ in range(steps):
            x, y = next(self._stream)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self.loss(x, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


# --------------------------------------------------------------------------------------------
# (b) atc's loop


class AtcLoop:
    """(b): ``train_one_epoch`` with the runtime ``fit`` builds (CUDA graph where it applies)."""

    def __init__(self, teacher, student, pairs, data: ImageData, mean, std, batch: int, device, speed: Speed, cfg):
        self.amp = autocast_dtype(speed.precision, device)
        cl = device.type == "cuda" if speed.channels_last is None else speed.channels_last
        fmt = torch.channels_last if cl else torch.contiguous_format
        student.to(device, memory_format=fmt).train()
        teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
        self.batches = DeviceBatches(data.train_x, data.train_y, batch, mean, std, device, True, Augment(4, True), seed=0,
                                     channels_last=cl)
        self.objective = objective_from(cfg, "at+kd")
        self.opt, _ = make_optimizer(student, cfg, device, fused=self.amp != torch.float16)  # fused SGD, the recipe's weight decay
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.teacher = Teacher(teacher, pairs)
        example = next(iter(self.batches))[0][:2]
        self.model, self.runtime, self.compile_s = prepare_runtime(student, self.teacher, self.objective, speed, device,
                                                                   self.batches, self.amp, _Quiet(), self.opt, self.scaler,
                                                                   example)
        self.epoch = 0

    @property
    def status(self) -> GraphStatus:
        """What the step ran as so far (captured with the count, off with why, failed with the error)."""
        return self.runtime.step.status

    def _next_epoch(self, steps: int) -> None:
        n = len(self.batches)
        if steps > n:
            raise SystemExit(f"--steps {steps} is more than the {n} batches of the data; lower --steps or use more images")
        self.batches.set_epoch(self.epoch, n - steps)  # the last `steps` batches of a fresh epoch
        self.epoch += 1

    def run(self, steps: int) -> None:
        self._next_epoch(steps)
        train_one_epoch(self.model, self.batches, self.opt, self.objective, self.epoch, self.teacher, None, self.amp,
                        runtime=self.runtime)


class BeforeLoop(AtcLoop):
    """(c): atc's loop before the sync-free step: hooks, and every term and the accuracy read on the host per step."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.runtime.close()  # this loop takes the maps with its own hooks

    def run(self, steps: int) -> None:
        self._next_epoch(steps)
        pairs, device = self.teacher.pairs, self.batches.device
        s_taps = Taps(self.model, [p.student.module for p in pairs])
        t_taps = Taps(self.teacher.model, [p.teacher.module for p in pairs])
        sums: dict[str, float] = {}
        correct = 0
        try:
            for x, y in self.batches:
                with autocast(device, self.amp):
                    with torch.no_grad():
                        t_logits = self.teacher.model(x)
                    logits = self.model(x)
                maps = list(zip(s_taps.take([p.student.module for p in pairs]), t_taps.take([p.teacher.module for p in pairs])))
                terms = distillation_terms(self.objective, logits, y, t_logits, maps)
                if not all(torch.isfinite(v) for v in terms.values()):  # a host read per term, as the old check did
                    raise SystemExit("non-finite loss")
                self.opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                self.opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
        finally:
            s_taps.remove(), t_taps.remove()


class PartLoop:
    """(d): one part alone on a fixed device-resident batch, with (b)'s precision and memory format, eager."""

    def __init__(self, part: str, teacher, student, atc: AtcLoop, cfg, device):
        self.part, self.amp, self.device = part, atc.amp, device
        self.x, self.y = (t.clone() for t in next(iter(atc.batches)))
        fmt = torch.channels_last if atc.batches.channels_last else torch.contiguous_format
        self.model = (teacher if part == "teacher" else student).to(device, memory_format=fmt)
        if part == "teacher":
            self.model.eval().requires_grad_(False)
        else:
            self.model.train()
            self.opt, _ = make_optimizer(self.model, cfg, device)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.part == "teacher":
                with torch.inference_mode(), autocast(self.device, self.amp):
                    self.model(self.x)
                continue
            with autocast(self.device, self.amp):
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def product_rate(device: torch.device, batch: int, images: int, epochs: int, cuda_graphs: bool | None) -> dict:
    """(e): ``fit`` through the library, WRN-16-2 → WRN-16-1 AT+KD, as ``atc compress`` distils; rates from the metrics."""
    import tempfile

    data = synthetic(images)
    mean, std = data.channel_stats()
    cfg = load_config("cifar", {"train": {"epochs": epochs, "batch_size": batch}})
    torch.manual_seed(0)
    teacher, student = create_model("wrn-16-2", data.num_classes), create_model("wrn-16-1", data.num_classes)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 32, 32), "all")
    with tempfile.TemporaryDirectory() as out:
        r = fit(student, data, cfg, out, mean, std, Teacher(teacher, pairs), objective_from(cfg, "at+kd"), device, _Quiet(),
                options=FitOptions(speed=Speed(cuda_graphs=cuda_graphs)))
    per_epoch = [h["images_per_s"] for h in r.history]
    return {"images_per_s": per_epoch[-1], "per_epoch": per_epoch, "batch_size": batch, "images": images, "epochs": epochs,
            "pair": "wrn-16-2 -> wrn-16-1", "method": "at+kd", "cuda_graphs": r.cuda_graphs.to_dict()}


class _Quiet(Reporter):
    def info(self, message: str) -> None:
        print(f"  {message}", flush=True)


# --------------------------------------------------------------------------------------------


def same_objective(teacher, student, pairs, x, y, cfg) -> float:
    """Relative difference between the reference's loss and atc's on one batch (fp32, same weights)."""
    t, s = copy.deepcopy(teacher).eval(), copy.deepcopy(student).train()
    state = copy.deepcopy(s.state_dict())
    a = float(RefObjective(t, s, pairs)(x, y).detach())
    s.load_state_dict(state)  # the same BN statistics for the second forward
    s_taps, t_taps = Taps(s, [p.student.module for p in pairs]), Taps(t, [p.teacher.module for p in pairs])
    with torch.no_grad():
        t_logits = t(x)
    logits = s(x)
    maps = list(zip(s_taps.take([p.student.module for p in pairs]), t_taps.take([p.teacher.module for p in pairs])))
    b = float(distillation_terms(objective_from(cfg, "at+kd"), logits, y, t_logits, maps)["loss"].detach())
    return abs(a - b) / max(abs(a), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="CIFAR-10 (torchvision folder or ImageFolder train/+test/); default: random uint8 images")
    ap.add_argument("--teacher", default="wrn-40-4")
    ap.add_argument("--student", default="wrn-16-2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, help="default 512 on CUDA, 32 on the CPU")
    ap.add_argument("--steps", type=int, help="timed steps per round and loop (default 50 on CUDA, 2 on the CPU)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 5 on CUDA, 2 on the CPU)")
    ap.add_argument("--warmup", type=int, help="untimed steps of each loop first (default 10 on CUDA, 1 on the CPU)")
    ap.add_argument("--workers", type=int, help="reference DataLoader workers (default 4 on CUDA, 2 on the CPU)")
    ap.add_argument("--images", type=int, help="training images (default: all of --data; random: 50,000 on CUDA, 1,024 on the CPU)")
    ap.add_argument("--precision", default="auto", help="atc's loop: auto (bf16 on CUDA), bf16, fp16, fp32")
    ap.add_argument("--no-channels-last", action="store_true", help="atc's loop without channels_last")
    ap.add_argument("--compile", action="store_true", help="atc's loop with torch.compile (compile time printed apart)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, time atc's loop only as the eager sync-free step")
    ap.add_argument("--no-parts", action="store_true", help="skip the parts alone (teacher forward, student CE step)")
    ap.add_argument("--product-epochs", type=int, help="epochs of the product path, fit() (default 2 on CUDA, 1 on the CPU; 0 skips it)")
    ap.add_argument("--product-batch-size", type=int, default=128, help="batch of the product path (the paper's 128)")
    ap.add_argument("--product-images", type=int, help="random images of the product path (default 50,000 on CUDA, 512 on the CPU)")
    ap.add_argument("--out", type=Path, default=Path("runs/throughput.json"))
    args = ap.parse_args()

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch_size or (512 if gpu else 32)
    steps, rounds = args.steps or (50 if gpu else 2), args.rounds or (5 if gpu else 2)
    warmup, workers = args.warmup if args.warmup is not None else (10 if gpu else 1), args.workers if args.workers is not None else (4 if gpu else 2)
    if args.data:
        data = open_dataset(args.data)
        data = data.subset(args.images or 0, 0, seed=0)
    else:
        data = synthetic(args.images or (CIFAR_TRAIN if gpu else 1024))
    mean, std = data.channel_stats()
    cfg = load_config("cifar", {"train": {"batch_size": batch}})
    torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    teacher, student = create_model(args.teacher, data.num_classes), create_model(args.student, data.num_classes)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 32, 32), "all")
    probe = DeviceBatches(data.train_x[:8], data.train_y[:8], 8, mean, std, torch.device("cpu"), False)
    rel = same_objective(teacher, student, pairs, *next(iter(probe)), cfg)
    t_macs, s_macs = count_macs(teacher, (3, 32, 32)).gmacs, count_macs(student, (3, 32, 32)).gmacs
    gmacs_per_image = t_macs + 3 * s_macs
    print(f"{args.teacher} -> {args.student} AT+KD ({len(pairs)} AT pairs), batch {batch}, {len(data.train_y):,} {data.name} images, "
          f"on {torch.cuda.get_device_name(device) if gpu else 'CPU'}; reference and atc losses agree to {rel:.1e} (relative)", flush=True)
    if rel > 1e-4:
        raise SystemExit("the two loops do not compute the same loss; the comparison would be unfair")

    fresh = lambda: (copy.deepcopy(teacher), copy.deepcopy(student))  # noqa: E731
    base = dict(precision=args.precision, channels_last=False if args.no_channels_last else None)
    loops: dict[str, object] = {"reference": ReferenceLoop(*fresh(), pairs, data, mean, std, batch, workers, device)}
    loops["atc_before"] = BeforeLoop(*fresh(), pairs, data, mean, std, batch, device, Speed(**base, cuda_graphs=False), cfg)
    # atc as fit runs it (a CUDA graph where it applies; what it ran as is read from its status after
    # the timing), and beside it the eager step alone when the graph may have run
    loops["atc"] = AtcLoop(*fresh(), pairs, data, mean, std, batch, device,
                           Speed(**base, compile=args.compile, cuda_graphs=False if args.no_cuda_graphs else None), cfg)
    eager_key = "atc_eager" if gpu and not args.no_cuda_graphs and not args.compile else "atc"
    if eager_key == "atc_eager":
        loops[eager_key] = AtcLoop(*fresh(), pairs, data, mean, std, batch, device, Speed(**base, cuda_graphs=False), cfg)
    atc_eager = loops[eager_key]
    if not args.no_parts:
        loops["teacher_forward"] = PartLoop("teacher", *fresh(), atc_eager, cfg, device)
        loops["student_ce_step"] = PartLoop("student", *fresh(), atc_eager, cfg, device)

    def timed(loop, n: int) -> tuple[float, float]:
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        loop.run(n)
        if gpu:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        return n * batch / seconds, (torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan"))

    print(f"warm-up: {warmup} step(s) of each loop", flush=True)
    for loop in loops.values():
        timed(loop, warmup)
    rates: dict[str, list[float]] = {k: [] for k in loops}
    peaks = {k: 0.0 for k in loops}
    for r in range(rounds):
        for name, loop in loops.items():
            rate, peak = timed(loop, steps)
            rates[name].append(rate)
            peaks[name] = max(peaks[name], peak)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in rates.items()) + " img/s", flush=True)

    product_epochs = args.product_epochs if args.product_epochs is not None else (2 if gpu else 1)
    product = None
    if product_epochs:
        print(f"product path: fit(), wrn-16-2 -> wrn-16-1 AT+KD, batch {args.product_batch_size}, {product_epochs} epoch(s)", flush=True)
        product = product_rate(device, args.product_batch_size, args.product_images or (CIFAR_TRAIN if gpu else 512), product_epochs,
                               False if args.no_cuda_graphs else None)

    status = loops["atc"].status
    graphs = status.state == "captured"
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["atc"] / med["reference"]
    before_ratio = med[eager_key] / med["atc_before"]
    peak_tflops = bf16_peak(torch.cuda.get_device_name(device)) if gpu else None
    achieved_tflops = med["atc"] * 2 * gmacs_per_image / 1e3
    share = achieved_tflops / peak_tflops if peak_tflops else None
    schedule_h = {k: EPOCHS * CIFAR_TRAIN / v / 3600 for k, v in med.items()}
    amp = autocast_dtype(args.precision, device)
    prec = "bf16" if amp == torch.bfloat16 else "fp16" if amp == torch.float16 else "fp32"
    cl = "channels_last" if (gpu and not args.no_channels_last) else "NCHW"
    data_desc = "GPU-resident data" if gpu else "device-resident data"
    setups = {"reference": f"fp32 eager, torchvision transforms, DataLoader {workers} workers",
              "atc_before": f"{prec}, {cl}, {data_desc}, eager, hooks, host reads every step (the loop before this change)",
              "atc": f"{prec}, {cl}, fused SGD, {data_desc}, "
                     + (f"whole step as one CUDA graph ({status.captures} capture(s), {status.replays} replays)" if graphs
                        else "torch.compile" if args.compile else f"eager ({status.why or status.state})") + ", sync-free",
              "atc_eager": f"{prec}, {cl}, fused SGD, {data_desc}, eager, sync-free",
              "teacher_forward": f"{args.teacher} forward alone, {prec}, {cl}, inference mode",
              "student_ce_step": f"{args.student} training step alone (CE only), {prec}, {cl}"}

    print()
    print("| loop | setup | images/s (median) | per round | peak GPU memory | 200-epoch CIFAR schedule |")
    print("|---|---|---|---|---|---|")
    for name in loops:
        mem = f"{peaks[name]:.2f} GiB" if gpu else "n/a (CPU)"
        sched = f"{schedule_h[name]:.1f} h" if name not in ("teacher_forward", "student_ce_step") else "n/a"
        print(f"| {name} | {setups[name]} | {med[name]:,.1f} | {', '.join(f'{v:,.0f}' for v in rates[name])} | {mem} | {sched} |")
    if product:
        print(f"| product | fit(), wrn-16-2 -> wrn-16-1 AT+KD, batch {product['batch_size']}, {product['images']:,} random images | "
              f"{product['images_per_s']:,.1f} | per epoch {', '.join(f'{v:,.0f}' for v in product['per_epoch'])} | | |")
    print()
    if "teacher_forward" in med:
        serial = 1 / (1 / med["teacher_forward"] + 1 / med["student_ce_step"])
        print(f"parts alone: teacher forward {med['teacher_forward']:,.1f} img/s, student CE step {med['student_ce_step']:,.1f} img/s; "
              f"run one after the other they would give {serial:,.1f} img/s, atc's loop runs {med['atc']:,.1f} "
              f"({med['atc'] / serial:.2f}x of that; AT and KD terms and augmentation are extra work)")
    print(f"work per image (fvcore, 1 multiply-add = 1 flop): teacher forward {t_macs:.4f} GMACs + student forward and backward "
          f"3 x {s_macs:.4f} GMACs = {gmacs_per_image:.4f} GMACs = {2 * gmacs_per_image:.3f} GFLOPs")
    if share is not None:
        print(f"atc's rate is {achieved_tflops:,.1f} TFLOP/s = {100 * share:.1f}% of the GPU's dense bf16 peak ({peak_tflops:,.1f} TFLOP/s)")
    else:
        print(f"atc's rate is {achieved_tflops:,.3f} TFLOP/s; no bf16 peak known for this device, so no share is given")
    compile_s = atc_eager.compile_s
    if compile_s:
        print(f"torch.compile took {compile_s:.1f} s before the first step (not in the rates above)")
    verdict = "not slower than today" if before_ratio >= 0.97 else "SLOWER than today"
    print(f"{'CPU' if not gpu else 'eager'}: sync-free loop {med[eager_key]:,.1f} img/s vs the loop before {med['atc_before']:,.1f} img/s "
          f"= {before_ratio:.2f}x ({verdict}; 0.97 allows for timing noise)")

    env = environment()
    result = {"teacher": args.teacher, "student": args.student, "method": "at+kd", "batch_size": batch, "steps": steps,
              "rounds": rounds, "warmup": warmup, "reference_workers": workers, "images": len(data.train_y), "data": data.name,
              "device": torch.cuda.get_device_name(device) if gpu else env.get("cpu"), "atc_setup": setups["atc"], "setups":
              {k: setups[k] for k in loops}, "cuda_graphs": status.to_dict(), "images_per_s": med, "per_round": rates, "ratio": ratio,
              "ratio_vs_before": before_ratio, "product_images_per_s": product["images_per_s"] if product else None,
              "product": product, "peak_gpu_gib": peaks if gpu else None,
              "gmacs_per_image": gmacs_per_image, "gflops_per_image": 2 * gmacs_per_image, "achieved_tflops": achieved_tflops,
              "bf16_peak_tflops": peak_tflops, "share_of_bf16_peak": share, "schedule_hours_200_epochs": schedule_h,
              "compile_seconds": compile_s, "loss_relative_difference": rel, "command": " ".join(["python"] + sys.argv),
              "environment": env}
    fileio.write_json(args.out, result)
    where = torch.cuda.get_device_name(device) if gpu else "CPU (reduced sizes)"
    prod = (f", product path {product['images_per_s']:,.1f} img/s ({product['cuda_graphs']['state']}, "
            f"{product['cuda_graphs']['captures']} capture(s))") if product else ""
    print(f"throughput: atc {med['atc']:,.1f} img/s vs reference {med['reference']:,.1f} img/s = {ratio:.2f}x on {where}, "
          f"{args.teacher} -> {args.student} AT+KD batch {batch}{prod}; wrote {args.out}")


if __name__ == "__main__":
    main()
