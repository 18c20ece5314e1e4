"""In-memory datasets and their batch iterators.

Small datasets (digits, CIFAR, CUB-sized folders) are decoded once into uint8 tensors, cached
on disk keyed by the files' names, sizes and times, and kept on the training device; random
crop, flip and normalisation run per batch on that device. Batch ``k`` of epoch ``e`` is a pure
function of (seed, e, k), which is what lets a killed run resume bit-for-bit.

Nothing crosses from the host to the device inside an epoch (``DeviceBatches``): the epoch's
order and each batch's crop offsets and flips are drawn on the device by the device's own
generator, seeded per (seed, epoch) and (seed, epoch, step) (seeding is host-side state: no copy,
no synchronisation). On the CPU these are the CPU generator's numbers as before; on CUDA they are
CUDA's, so a CUDA run's batches differ from a CPU run's with the same seed, and each repeats on
its own kind of device. The ``meta`` device (tests' stand-in for CUDA) has no generator and no
values: its draws take a CPU generator that meta ignores.

Datasets are opened through ``compressor.data.open`` (the layouts it accepts are listed there);
``ImageData`` is its in-memory implementation of the ``Dataset`` protocol.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class ImageData:
    """A dataset held in memory as uint8 images (N×C×H×W) and int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    skipped_files: list[str] = field(default_factory=list)
    # What was done to the source images to make them N×3×H×W uint8, for the report to state:
    source_channels: tuple[int, ...] = ()  # distinct channel counts of the files as stored (1 = grayscale); () unknown
    resized_images: int = 0  # how many images were resized to H×W
    resized_from: tuple[int, int] | None = None  # their (H, W) before, when they all had one size; None otherwise
    notes: list[str] = field(default_factory=list)  # the above as one-line sentences, ready to print

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        return channel_stats(self.train_x)

    def subset(self, train: int = 0, test: int = 0, seed: int = 0) -> "ImageData":
        """A class-stratified-by-chance subset, for short schedules; 0 keeps everything."""
        g = torch.Generator().manual_seed(seed)

        def pick(x, y, n):
            idx = subset_indices(len(y), n, g)
            return (x, y) if idx is None else (x[idx], y[idx])

        tx, ty = pick(self.train_x, self.train_y, train)
        vx, vy = pick(self.test_x, self.test_y, test)
        return dataclasses.replace(self, train_x=tx, train_y=ty, test_x=vx, test_y=vy)


def source_notes(channels: list[int] | tuple[int, ...], resized: int, sizes: list, total: int, size: tuple[int, int],
                 sixteen_bit: int = 0) -> list[str]:
    """One-line sentences on how source images became 3-channel ``size`` images (none when nothing changed)."""
    notes = []
    if sixteen_bit:
        notes.append(f"{sixteen_bit:,} 16-bit image(s) scaled to 8 bits")
    if channels and list(channels) != [3]:
        kinds = {1: "1-channel (grayscale)", 2: "2-channel (grayscale + alpha)", 4: "4-channel (RGBA or CMYK)"}
        what = " and ".join(kinds.get(c, f"{c}-channel") for c in channels if c != 3)
        mixed = " (mixed with RGB)" if 3 in channels else ""
        notes.append(f"{what} images{mixed} converted to RGB" + (" by repeating the channel" if 1 in channels else "")
                     + (", alpha dropped" if 2 in channels or 4 in channels else ""))
    if resized:
        hw = lambda s: f"{s[0]}x{s[1]}"  # noqa: E731
        source = f"from {hw(sizes[0])}" if len(sizes) == 1 else f"from several sizes (e.g. {', '.join(map(hw, sizes))})"
        notes.append(f"{resized:,} of {total:,} images resized {source} to {hw(size)} (bilinear)")
    return notes


def with_source(data: "ImageData", channels, resized: int, sizes: list, sixteen_bit: int = 0) -> "ImageData":
    """``data`` with its source fields and notes filled in (``sizes``: up to two distinct (H, W) of resized images)."""
    total = len(data.train_y) + len(data.test_y) + len(data.skipped_files)
    size = tuple(data.train_x.shape[2:4])
    return dataclasses.replace(
        data, source_channels=tuple(channels), resized_images=int(resized),
        resized_from=tuple(sizes[0]) if resized and len(sizes) == 1 else None,  # type: ignore[arg-type]
        notes=source_notes(channels, resized, sizes, total, size, sixteen_bit))  # type: ignore[arg-type]


def channel_stats(x_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (floored at 1e-3) of uint8 images N×C×H×W, in [0, 1] units."""
    x = x_uint8.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def batch_seed(seed: int, epoch: int, step: int | None = None) -> int:
    """The generator seed of an epoch's order (``step=None``) or of one batch's augmentation: a pure
    function of (seed, epoch, step), reduced into the 64 bits a torch generator takes (any seed works;
    every value that fitted before is unchanged)."""
    mixed = seed * 1_000_003 + epoch
    if step is not None:
        mixed = mixed * 1_000_003 + step
    return mixed % (1 << 64)


def subset_indices(total: int, n: int, g: torch.Generator) -> torch.Tensor | None:
    """``n`` sorted random indices out of ``total`` drawn with ``g``; None when all are kept (``n`` 0 or ≥ total).
    In-memory and streamed datasets both pick through here, so a subset is the same images either way."""
    if not n or n >= total:
        return None
    return torch.randperm(total, generator=g)[:n].sort().values


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel run: its rank among ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 4
    flip: bool = True


class Batches:
    """What every batch iterator shares: the epoch's order, this rank's share, normalisation.

    ``set_epoch`` picks the epoch whose order and augmentation to replay, ``start_step`` skips
    batches already done. Subclasses hold the images and yield ``(images, labels)``.
    """

    def __init__(self, y: torch.Tensor, batch_size: int, mean, std, device: torch.device, train: bool,
                 augment: Augment = Augment(), seed: int = 0, drop_last: bool | None = None,
                 shard: Shard = Shard(), channels_last: bool = False):
        self.y = y
        self.batch_size, self.device, self.train, self.augment = batch_size, device, train, augment
        self.seed, self.epoch, self.start_step = seed, 0, 0
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size, self.channels_last = shard.rank, shard.world_size, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def close(self) -> None:
        """Release what reading needs beyond the tensors (the streamed loader's worker processes)."""

    def __enter__(self) -> "Batches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _order(self, device: torch.device | None = None) -> torch.Tensor:
        """This epoch's indices for this rank, made on ``device`` (the CPU by default)."""
        n, device = len(self.y), device or torch.device("cpu")
        if not self.train:
            idx = torch.arange(n, device=device)
        else:
            g = device_generator(device).manual_seed(batch_seed(self.seed, self.epoch))
            idx = torch.randperm(n, generator=g, device=device)
        per_rank = len(idx) // self.world_size if self.world_size > 1 and self.train else None
        if per_rank is not None:
            idx = idx[self.rank * per_rank:(self.rank + 1) * per_rank]
        elif self.world_size > 1:
            idx = idx[self.rank::self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self._order())
        # A dataset smaller than one batch still trains: dropping the last batch would drop everything.
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)

    def skipped_files(self) -> list[str]:
        """Unreadable files met while reading (streamed data finds them as it goes; in-memory data
        skipped them when it was decoded)."""
        return []

    def _normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class DeviceBatches(Batches):
    """Batches of a device-resident uint8 dataset, augmented and normalised on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, mean, std, device: torch.device,
                 train: bool, augment: Augment = Augment(), seed: int = 0, drop_last: bool | None = None,
                 shard: Shard = Shard(), channels_last: bool = False):
        super().__init__(y.to(device), batch_size, mean, std, device, train, augment, seed, drop_last, shard, channels_last)
        self.x = x.to(device)
        self._gen: torch.Generator | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(self.device)
        for step in range(self.start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.x[idx]
            if self.train:
                x = self._augment(x, step)
            yield self._normalise(x), self.y[idx]
        self.start_step = 0

    def _augment(self, x: torch.Tensor, step: int) -> torch.Tensor:
        # The generator seeded per (seed, epoch, step): any batch can be replayed without the ones before it.
        if self._gen is None:
            self._gen = device_generator(x.device)
        g = self._gen.manual_seed(batch_seed(self.seed, self.epoch, step))
        b, _, h, w = x.shape
        pad = self.augment.crop_padding
        if pad:
            dy = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
            dx = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
            x = _crop(F.pad(x, (pad, pad, pad, pad)), dy, dx, h, w)
        if self.augment.flip:
            flip = torch.rand(b, generator=g, device=x.device) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return x


def device_generator(device: torch.device) -> torch.Generator:
    """A generator that draws on ``device`` (meta, which has no values, takes a CPU one: its draws ignore it)."""
    return torch.Generator(device="cpu" if device.type == "meta" else device)


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample crops of size h×w at offsets (dy, dx), one gather per axis."""
    b, c, hp, wp = padded.shape
    rows = (dy.view(b, 1) + torch.arange(h, device=padded.device)).view(b, 1, h, 1).expand(b, c, h, wp)
    out = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w, device=padded.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return out.gather(3, cols)
