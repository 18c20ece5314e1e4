"""Where the training images live: on the training device when they fit, streamed from disk when not.

The decision compares the bytes a dataset takes as uint8 tensors (train + test, N×3×H×W) with a
budget: ``DEFAULT_FRACTION`` of the free memory of the CUDA device, or of the available RAM when
training on the CPU (a folder that fits is decoded into RAM first, so on CUDA it must fit both).
The environment variable ``ATC_DATA_BUDGET_MB`` replaces the budget, e.g. to force streaming.

Data that fits goes the in-memory way (``compressor.data``: decoded once, cached on disk, kept on
the device, augmented there per batch). Data that does not is a ``StreamingData``: an ImageFolder
tree listed but not decoded (or host tensors that do not fit the GPU), read by a ``DataLoader``
with worker processes, pinned memory, persistent workers and prefetching. Workers decode and
augment uint8 images (pad-4 crop and flip for small images, RandomResizedCrop and flip for the
224-px presets); the batch is moved to the device as uint8 and normalised there, the same
arithmetic as the in-memory path. ``LoaderBatches`` has the interface of ``DeviceBatches``:
``set_epoch(epoch, start_step)``, ``len()`` and iteration over normalised ``(x, y)`` on the device,
with the same per-epoch order and rank sharding. Augmentation of sample ``i`` in epoch ``e`` is a
function of (seed, e, i), so it does not depend on the number of workers.

Test-time images are resized to ``image_size``×``image_size`` exactly as the in-memory path does
(no centre crop), so a model sees the same test images whichever path it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from compressor.data.folders import find_layout, list_splits, new_source_info, record_source, to_rgb
from compressor.data.images import Augment, Batches, ImageData, channel_stats, source_notes, subset_indices
from compressor.data.open import open_dataset
from compressor.errors import DataError
from compressor.events import SILENT, Reporter

DEFAULT_FRACTION = 0.5

BUDGET_ENV = "ATC_DATA_BUDGET_MB"

RRC_MIN_SIZE = 64  # images this large or larger, with no crop padding, get RandomResizedCrop when streamed

_MB = 1 << 20


# ----------------------------------------------------------------------------------------------
# The decision


def available_ram() -> int:
    """Bytes of RAM the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_budget(device: torch.device, fraction: float = DEFAULT_FRACTION, decode_in_ram: bool = False) -> tuple[int, str]:
    """The bytes a dataset may take on ``device`` and what they are a share of.

    On CUDA: ``fraction`` of its free memory (and, when the data must first be decoded into RAM,
    no more than ``fraction`` of the available RAM). On the CPU: ``fraction`` of the available RAM.
    """
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            return int(float(env) * _MB), f"{BUDGET_ENV}={env}"
        except ValueError:
            raise DataError(f"{BUDGET_ENV}={env!r} is not a number of megabytes; set it to e.g. 2048 or unset it") from None
    pct = f"{100 * fraction:.0f}%"
    ram = int(available_ram() * fraction)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = int(free * fraction)
        if decode_in_ram and ram < gpu:
            return ram, f"{pct} of available RAM, which the images are decoded into first"
        return gpu, f"{pct} of free memory on {device}"
    return ram, f"{pct} of available RAM"


@dataclass(frozen=True)
class Residency:
    """Whether a dataset is kept on the training device, and the numbers behind the answer."""

    fits: bool
    need_bytes: int
    budget_bytes: int
    budget_of: str
    images: int
    device: str

    def message(self, workers: int) -> str:
        need, budget = self.need_bytes / _MB, self.budget_bytes / _MB
        head = f"data: {self.images:,} images take {need:,.2f} MB as uint8; budget {budget:,.2f} MB ({self.budget_of})"
        if self.fits:
            return f"{head}: kept on {self.device}, cropped, flipped and normalised there per batch"
        return (f"{head}: too large to keep on {self.device}, streaming with a DataLoader ({workers} worker"
                f"{'s' if workers != 1 else ''}{', pinned memory' if self.device.startswith('cuda') else ''})")


def decide(need_bytes: int, images: int, device: torch.device, budget_bytes: int | None = None,
           fraction: float = DEFAULT_FRACTION, decode_in_ram: bool = False) -> Residency:
    """Compare ``need_bytes`` with ``budget_bytes`` (default: ``memory_budget(device, fraction)``)."""
    if budget_bytes is None:
        budget_bytes, of = memory_budget(device, fraction, decode_in_ram)
    else:
        of = "given budget"
    return Residency(need_bytes <= budget_bytes, int(need_bytes), int(budget_bytes), of, int(images), str(device))


def default_workers() -> int:
    """DataLoader workers per process: the CPU cores shared by the local ranks, one left for the main process, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // local - 1))


# ----------------------------------------------------------------------------------------------
# Image sources: indexable uint8 images without decoding them all


class FolderImages:
    """Image files of one split, decoded on demand to uint8 C×H×W (resized to ``size`` unless ``native``)."""

    def __init__(self, files: Sequence[str], labels: torch.Tensor, size: int, strict: bool = False):
        self.files, self.labels, self.size, self.strict = list(files), labels, size, strict

    def __len__(self) -> int:
        return len(self.files)

    def select(self, idx: torch.Tensor) -> "FolderImages":
        return FolderImages([self.files[i] for i in idx.tolist()], self.labels[idx], self.size, self.strict)

    def image(self, i: int, native: bool = False) -> torch.Tensor:
        """Image ``i``; an unreadable file is replaced by the next readable one unless ``strict``."""
        from PIL import Image, UnidentifiedImageError

        for k in range(min(len(self.files), 16)):
            f = self.files[(i + k) % len(self.files)]
            try:
                with Image.open(f) as im:
                    im = to_rgb(im)  # 16-bit grayscale scaled to 8 bits, as compressor.data.folders._decode
                    if not native and im.size != (self.size, self.size):
                        im = im.resize((self.size, self.size), Image.BILINEAR)  # as compressor.data._decode
                    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                if self.strict:
                    raise DataError(f"corrupt image {f} ({type(exc).__name__}); remove it, or run without --strict-data to "
                                    "skip unreadable images") from exc
        raise DataError(f"16 images in a row from {self.files[i]} on could not be decoded; check the files")

    def nbytes(self) -> int:
        return len(self.files) * 3 * self.size * self.size


class TensorImages:
    """Already decoded uint8 images (N×C×H×W) in host memory."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, idx: torch.Tensor) -> "TensorImages":
        return TensorImages(self.x[idx], self.labels[idx])

    def image(self, i: int, native: bool = False) -> torch.Tensor:
        return self.x[i]

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()


def _split_bytes(src) -> int:
    return src.nbytes() + len(src.labels) * 8


@dataclass
class StreamingData:
    """A dataset read batch by batch instead of being held in memory; duck-types ``ImageData``
    for what training needs (names, labels, sizes, ``channel_stats``, ``subset``)."""

    name: str
    train: FolderImages | TensorImages
    test: FolderImages | TensorImages
    class_names: list[str]
    image_size: int
    channels: int = 3
    skipped_files: list[str] = field(default_factory=list)
    # as ImageData's; for a folder, estimated from the headers of a sample of files (see ``_probe``)
    source_channels: tuple[int, ...] = ()
    resized_images: int = 0
    resized_from: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_folder(cls, root: Path, image_size: int, strict: bool = False) -> "StreamingData":
        _, (train_files, train_labels, classes), (test_files, test_labels, _) = list_splits(root)
        train = FolderImages([str(f) for f in train_files], torch.tensor(train_labels, dtype=torch.long), image_size, strict)
        test = FolderImages([str(f) for f in test_files], torch.tensor(test_labels, dtype=torch.long), image_size, strict)
        return cls(root.name, train, test, classes, image_size, **_probe(train.files + test.files, image_size))

    @classmethod
    def from_memory(cls, data: ImageData) -> "StreamingData":
        c, h, _ = data.input_size
        return cls(data.name, TensorImages(data.train_x, data.train_y), TensorImages(data.test_x, data.test_y),
                   list(data.class_names), h, c, list(data.skipped_files), tuple(data.source_channels),
                   data.resized_images, data.resized_from, list(data.notes))

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.labels

    @property
    def test_y(self) -> torch.Tensor:
        return self.test.labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def nbytes(self) -> int:
        return _split_bytes(self.train) + _split_bytes(self.test)

    def channel_stats(self, sample: int = 1000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images: exact for up to ``sample`` images, else
        estimated on ``sample`` of them spread evenly over the (class-sorted) list."""
        n = len(self.train)
        idx = range(n) if n <= sample else np.linspace(0, n - 1, sample).round().astype(int).tolist()
        return channel_stats(torch.stack([self.train.image(int(i)) for i in idx]))

    def subset(self, train: int = 0, test: int = 0, seed: int = 0) -> "StreamingData":
        """The same images ``ImageData.subset`` picks from the same (fully readable) files."""
        g = torch.Generator().manual_seed(seed)

        def pick(src, n):
            idx = subset_indices(len(src), n, g)
            return src if idx is None else src.select(idx)

        return dataclasses.replace(self, train=pick(self.train, train), test=pick(self.test, test))


# ----------------------------------------------------------------------------------------------
# Opening a dataset for a device


def open_for_device(spec: str | os.PathLike, image_size: int | None, device: torch.device, *, strict: bool = False,
                    train_subset: int = 0, test_subset: int = 0, budget_bytes: int | None = None, workers: int | None = None,
                    reporter: Reporter = SILENT) -> ImageData | StreamingData:
    """``spec`` opened for training on ``device``: in memory when it fits the budget, else streamed.

    The subset (``train_subset``/``test_subset``, picked with seed 0 as ``ImageData.subset`` does) is
    taken before the decision, so a small subset of a large folder is decoded, not streamed.
    """
    workers = default_workers() if workers is None else workers
    folder = None
    if str(spec) not in ("digits", "shapes"):
        kind, root = find_layout(Path(spec).expanduser())
        folder = root if kind == "folder" else None
    if folder is not None and image_size:
        full = StreamingData.from_folder(folder, image_size, strict)
        lazy = full.subset(train_subset, test_subset, seed=0)
        res = decide(lazy.nbytes(), len(lazy.train) + len(lazy.test), device, budget_bytes, decode_in_ram=True)
        reporter.info(res.message(workers))
        if not res.fits:
            return lazy
        if lazy is full or decide(full.nbytes(), 0, torch.device("cpu"), budget_bytes).fits:
            # the in-memory path, unchanged: decode the whole folder once (cached), then take the subset
            return open_dataset(spec, image_size=image_size, strict=strict).subset(train_subset, test_subset, seed=0)
        return _decode_subset(lazy)
    data = open_dataset(spec, image_size=image_size, strict=strict).subset(train_subset, test_subset, seed=0)
    need = sum(t.numel() * t.element_size() for t in (data.train_x, data.train_y, data.test_x, data.test_y))
    res = decide(need, len(data.train_y) + len(data.test_y), device, budget_bytes)
    reporter.info(res.message(workers))
    return data if res.fits else StreamingData.from_memory(data)


def _decode_subset(lazy: StreamingData) -> ImageData:
    """Decode only the picked files of a folder too large to decode whole (no disk cache: it is keyed by the whole split)."""
    def split(src: FolderImages) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([src.image(i) for i in range(len(src))]), src.labels

    (tx, ty), (vx, vy) = split(lazy.train), split(lazy.test)  # type: ignore[arg-type]
    return ImageData(lazy.name, tx, ty, vx, vy, lazy.class_names, source_channels=lazy.source_channels,
                     resized_images=lazy.resized_images, resized_from=lazy.resized_from, notes=list(lazy.notes))


PROBE_FILES = 64


def _probe(files: list[str], image_size: int, sample: int = PROBE_FILES) -> dict:
    """Source fields of a folder too large to decode, from the headers (mode, size) of ``sample`` files spread
    evenly over the list: opening a file reads its header only. The notes say they are an estimate."""
    from PIL import Image

    idx = range(len(files)) if len(files) <= sample else np.linspace(0, len(files) - 1, sample).round().astype(int).tolist()
    info, seen = new_source_info(), 0
    for i in idx:
        try:
            with Image.open(files[int(i)]) as im:
                record_source(info, im, im.size != (image_size, image_size))
                seen += 1
        except Exception:  # an unreadable file is dealt with (skipped or fatal) when it is decoded
            continue
    notes = source_notes(info["channels"], info["resized"], info["sizes"], seen, (image_size, image_size), info["wide"])
    if notes and seen < len(files):
        notes = [f"{n} (in a sample of {seen:,} of {len(files):,} files)" for n in notes]
    return {"source_channels": tuple(info["channels"]), "resized_images": info["resized"],
            "resized_from": tuple(info["sizes"][0]) if info["resized"] and len(info["sizes"]) == 1 else None,
            "notes": notes}


# ----------------------------------------------------------------------------------------------
# Augmentation in the workers (uint8 in, uint8 out) and the batch iterator


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (1 << 63))


def random_resized_crop_box(h: int, w: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering a random share ``scale`` of the image with aspect
    ratio in ``ratio`` (log-uniform); ten tries, then the largest centred crop within ``ratio``."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand(1, generator=g)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class _Split(torch.utils.data.Dataset):
    """Items are ``(index, epoch)`` pairs, so persistent workers see the epoch without being told."""

    def __init__(self, source, train: bool, augment: Augment, size: int, rrc: bool, seed: int):
        self.source, self.train, self.augment, self.size, self.rrc, self.seed = source, train, augment, size, rrc, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = item
        label = int(self.source.labels[i])
        if not self.train:
            return self.source.image(i), label
        g = _sample_generator(self.seed, epoch, i)
        if self.rrc:
            x = self.source.image(i, native=True)
            top, left, ch, cw = random_resized_crop_box(x.shape[1], x.shape[2], g)
            x = x[None, :, top:top + ch, left:left + cw].float()
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            x = x[0].round_().clamp_(0, 255).to(torch.uint8)
        else:
            x = self.source.image(i)
            pad = self.augment.crop_padding
            if pad:
                h, w = x.shape[1:]
                dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
                x = F.pad(x, (pad, pad, pad, pad))[:, dy:dy + h, dx:dx + w]
        if self.augment.flip and float(torch.rand(1, generator=g)) < 0.5:
            x = x.flip(2)
        return x.contiguous(), label


class _EpochBatches:
    """The batch sampler: this rank's share of the epoch's order, from ``start_step`` on, in batches."""

    def __init__(self, owner: "LoaderBatches"):
        self.owner = owner

    def __len__(self) -> int:
        return max(len(self.owner) - self.owner.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        o = self.owner
        order = o._order().tolist()
        for step in range(o.start_step, len(o)):
            yield [(i, o.epoch) for i in order[step * o.batch_size:(step + 1) * o.batch_size]]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism; threads inside them only compete


class LoaderBatches(Batches):
    """``DeviceBatches``' interface over a ``DataLoader``: same order, sharding and normalisation."""

    def __init__(self, source, batch_size: int, mean, std, device: torch.device, train: bool, augment: Augment = Augment(),
                 seed: int = 0, drop_last: bool | None = None, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, workers: int | None = None, prefetch: int = 4, image_size: int | None = None):
        super().__init__(source.labels, batch_size, mean, std, device, train, augment, seed, drop_last, rank, world_size,
                         channels_last)
        self.source = source
        size = image_size or int(source.image(0).shape[-1])
        rrc = train and augment.crop_padding == 0 and size >= RRC_MIN_SIZE
        self.workers = default_workers() if workers is None else workers
        self.dataset = _Split(source, train, augment, size, rrc, seed)
        extra = {"persistent_workers": True, "prefetch_factor": prefetch, "worker_init_fn": _worker_init} if self.workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_EpochBatches(self), num_workers=self.workers,
                                                  pin_memory=device.type == "cuda", **extra)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield self._normalise(x), y
        self.start_step = 0


def make_streaming_batches(data: StreamingData, batch_size: int, test_batch_size: int, mean, std, device: torch.device,
                           augment: Augment, seed: int, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                           workers: int | None = None) -> tuple[LoaderBatches, LoaderBatches]:
    """Train and test ``LoaderBatches`` of ``data``; the test loader gets a quarter of the workers (at least one)."""
    workers = default_workers() if workers is None else workers
    train = LoaderBatches(data.train, batch_size, mean, std, device, True, augment, seed, rank=rank, world_size=world_size,
                          channels_last=channels_last, workers=workers, image_size=data.image_size)
    test = LoaderBatches(data.test, test_batch_size, mean, std, device, False, augment, seed, rank=rank, world_size=world_size,
                         channels_last=channels_last, workers=min(workers, max(1, workers // 4)), image_size=data.image_size)
    return train, test
