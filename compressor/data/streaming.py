"""Datasets too large for the training device, read batch by batch with a DataLoader.

A ``StreamingData`` is an ImageFolder tree listed but not decoded (or host tensors that do not fit
the GPU); it implements the same ``Dataset`` protocol as the in-memory ``ImageData``
(``compressor.data.open``). ``LoaderBatches`` reads it with worker processes, pinned memory,
persistent workers and prefetching; the workers decode and augment uint8 images
(``compressor.data.crops``), the batch is moved to the device as uint8 and normalised there, the
same arithmetic as the in-memory path. ``LoaderBatches`` has the interface of ``DeviceBatches``:
``set_epoch(epoch, start_step)``, ``len()`` and iteration over normalised ``(x, y)`` on the device,
with the same per-epoch order and rank sharding.

Test-time images are resized to ``image_size``×``image_size`` exactly as the in-memory path does
(no centre crop), so a model sees the same test images whichever path it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from compressor.data.budget import default_workers
from compressor.data.crops import RRC_MIN_SIZE, AugmentedSplit
from compressor.data.folders import list_splits, new_source_info, record_source, to_rgb, upright
from compressor.data.images import Augment, Batches, ImageData, Shard, channel_stats, source_notes, subset_indices
from compressor.errors import DataError


class FolderImages:
    """Image files of one split, decoded on demand to uint8 C×H×W (resized to ``size`` unless ``native``)."""

    def __init__(self, files: Sequence[str], labels: torch.Tensor, size: int, strict: bool = False):
        self.files, self.labels, self.size, self.strict = list(files), labels, size, strict

    def __len__(self) -> int:
        return len(self.files)

    def select(self, idx: torch.Tensor) -> "FolderImages":
        return FolderImages([self.files[i] for i in idx.tolist()], self.labels[idx], self.size, self.strict)

    def image(self, i: int, native: bool = False) -> torch.Tensor:
        """The pixels of image ``i``, or of the next readable one when it cannot be decoded (see ``readable``)."""
        return self.readable(i, native)[1]

    def readable(self, i: int, native: bool = False) -> tuple[int, torch.Tensor]:
        """The first image from ``i`` on that decodes, as (its index, its pixels): a caller takes that
        image's own label with it, so an unreadable file is skipped, never replaced by another file's
        pixels under its label. With ``strict`` an unreadable file is fatal."""
        from PIL import Image, UnidentifiedImageError

        for k in range(min(len(self.files), 16)):
            j = (i + k) % len(self.files)
            f = self.files[j]
            try:
                with Image.open(f) as src:
                    im = to_rgb(upright(src)[0])  # as the in-memory decode (compressor.data.folders): EXIF, 16-bit
                    if not native and im.size != (self.size, self.size):
                        im = im.resize((self.size, self.size), Image.BILINEAR)  # as the in-memory decode
                    return j, torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
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

    def readable(self, i: int, native: bool = False) -> tuple[int, torch.Tensor]:
        return i, self.x[i]

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()


def _split_bytes(src) -> int:
    return src.nbytes() + len(src.labels) * 8


@dataclass
class StreamingData:
    """A dataset read batch by batch instead of being held in memory; a ``Dataset`` like ``ImageData``
    (names, labels, sizes, source notes, ``channel_stats``, ``subset``)."""

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


def decode_subset(lazy: StreamingData) -> ImageData:
    """Decode only the picked files of a folder too large to decode whole (no disk cache: it is keyed by
    the whole split). Unreadable files are skipped and listed, as the in-memory decode does."""
    skipped: list[str] = []

    def split(src: FolderImages | TensorImages) -> tuple[torch.Tensor, torch.Tensor]:
        xs, keep = [], []
        for i in range(len(src)):
            j, x = src.readable(i)
            if j != i:
                skipped.append(str(src.files[i]) if isinstance(src, FolderImages) else str(i))
                continue
            xs.append(x)
            keep.append(i)
        if not xs:
            raise DataError("no image of the picked subset could be decoded; check the files")
        return torch.stack(xs), src.labels[torch.tensor(keep, dtype=torch.long)]

    (tx, ty), (vx, vy) = split(lazy.train), split(lazy.test)
    return ImageData(lazy.name, tx, ty, vx, vy, lazy.class_names, list(lazy.skipped_files) + skipped,
                     source_channels=lazy.source_channels, resized_images=lazy.resized_images, resized_from=lazy.resized_from,
                     notes=list(lazy.notes))


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
                record_source(info, im, im.size != (image_size, image_size), upright(im)[1])
                seen += 1
        except Exception:  # an unreadable file is dealt with (skipped or fatal) when it is decoded
            continue
    notes = source_notes(info["channels"], info["resized"], info["sizes"], seen, (image_size, image_size), info["wide"])
    if info["rotated"]:
        notes.append(f"{info['rotated']:,} photo(s) turned upright by their EXIF orientation (as photo viewers show them)")
    if notes and seen < len(files):
        notes = [f"{n} (in a sample of {seen:,} of {len(files):,} files)" for n in notes]
    return {"source_channels": tuple(info["channels"]), "resized_images": info["resized"],
            "resized_from": tuple(info["sizes"][0]) if info["resized"] and len(info["sizes"]) == 1 else None,
            "notes": notes}


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


@dataclass(frozen=True)
class Loading:
    """How a ``LoaderBatches`` reads: DataLoader processes (None: ``default_workers()``), batches each
    prefetches, and the image size (None: that of the first image)."""

    workers: int | None = None
    prefetch: int = 4
    image_size: int | None = None


class LoaderBatches(Batches):
    """``DeviceBatches``' interface over a ``DataLoader``: same order, sharding and normalisation."""

    def __init__(self, source, batch_size: int, mean, std, device: torch.device, train: bool, augment: Augment = Augment(),
                 seed: int = 0, drop_last: bool | None = None, shard: Shard = Shard(), channels_last: bool = False,
                 loading: Loading = Loading()):
        super().__init__(source.labels, batch_size, mean, std, device, train, augment, seed, drop_last, shard, channels_last)
        self.source = source
        self.skipped: set[int] = set()
        size = loading.image_size or int(source.image(0).shape[-1])
        rrc = train and augment.crop_padding == 0 and size >= RRC_MIN_SIZE
        self.workers = default_workers() if loading.workers is None else loading.workers
        self.dataset = AugmentedSplit(source, train, augment, size, rrc, seed)
        extra = {"persistent_workers": True, "prefetch_factor": loading.prefetch, "worker_init_fn": _worker_init} \
            if self.workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_EpochBatches(self), num_workers=self.workers,
                                                  pin_memory=device.type == "cuda", **extra)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, skipped in self.loader:
            if bool((skipped >= 0).any()):
                self.skipped.update(int(i) for i in skipped[skipped >= 0])
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield self._normalise(x), y
        self.start_step = 0

    def close(self) -> None:
        """Stop the persistent DataLoader workers now. Left to the garbage collector (the loader and these
        batches refer to each other through the batch sampler), torch's shutdown then waits out each
        worker's poll interval: 10 s of nothing after a streamed run with two workers."""
        self.loader = None

    def skipped_files(self) -> list[str]:
        """The unreadable files met so far (each replaced by the next readable image with its own label)."""
        files = getattr(self.source, "files", None)
        return [str(files[i]) if files is not None else f"image {i}" for i in sorted(self.skipped)]


def make_streaming_batches(data: StreamingData, batch_size: int, test_batch_size: int, mean, std, device: torch.device,
                           augment: Augment, seed: int, shard: Shard = Shard(), channels_last: bool = False,
                           workers: int | None = None) -> tuple[LoaderBatches, LoaderBatches]:
    """Train and test ``LoaderBatches`` of ``data``; the test loader gets a quarter of the workers (at least one)."""
    workers = default_workers() if workers is None else workers
    train = LoaderBatches(data.train, batch_size, mean, std, device, True, augment, seed, shard=shard,
                          channels_last=channels_last, loading=Loading(workers, image_size=data.image_size))
    test = LoaderBatches(data.test, test_batch_size, mean, std, device, False, augment, seed, shard=shard,
                         channels_last=channels_last, loading=Loading(min(workers, max(1, workers // 4)), image_size=data.image_size))
    return train, test
