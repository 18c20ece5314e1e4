"""Datasets and batch iterators.

Small datasets (digits, CIFAR, CUB-sized folders) are decoded once into uint8 tensors, cached
on disk keyed by the files' names, sizes and times, and kept on the training device; random
crop, flip and normalisation run per batch on that device. Batch ``k`` of epoch ``e`` is a pure
function of (seed, e, k), which is what lets a killed run resume bit-for-bit.

Layouts accepted by ``open_dataset``: the word ``digits`` (scikit-learn's bundled 8×8 digits),
torchvision's CIFAR-10/100 folders (``cifar-10-batches-py``, ``cifar-100-python``) and
ImageFolder trees with ``train/`` and ``test/`` (or ``val/``) subfolders.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from compressor import fileio
from compressor.errors import DataError, OutputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


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
        return ImageData(self.name, tx, ty, vx, vy, self.class_names, self.skipped_files)


def channel_stats(x_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (floored at 1e-3) of uint8 images N×C×H×W, in [0, 1] units."""
    x = x_uint8.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def subset_indices(total: int, n: int, g: torch.Generator) -> torch.Tensor | None:
    """``n`` sorted random indices out of ``total`` drawn with ``g``; None when all are kept (``n`` 0 or ≥ total).
    In-memory and streamed datasets both pick through here, so a subset is the same images either way."""
    if not n or n >= total:
        return None
    return torch.randperm(total, generator=g)[:n].sort().values


def load_digits(image_size: int = 16) -> ImageData:
    """scikit-learn's 1,797 handwritten digits, upscaled to ``image_size`` and made RGB; 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images).float().div(16).unsqueeze(1)  # values 0..16
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut].sort().values, perm[cut:].sort().values
    return ImageData("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])


def _load_torchvision_cifar(root: Path, hundred: bool) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if hundred else CIFAR10
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DataError(f"{root}: the CIFAR files are incomplete or corrupt ({exc}); download them again") from exc

    def tensors(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)

    (tx, ty), (vx, vy) = tensors(train), tensors(test)
    return ImageData("cifar100" if hundred else "cifar10", tx, ty, vx, vy, list(train.classes))


def find_layout(root: Path) -> tuple[str, Path]:
    """Which supported layout ``root`` holds: ('cifar10'|'cifar100'|'folder', effective root)."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data DIR with train/ and test/ subfolders, a torchvision CIFAR folder, or 'digits'")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file; pass the folder that holds train/ and test/ (or val/)")
    if (root / "cifar-10-batches-py").is_dir() or root.name == "cifar-10-batches-py":
        return "cifar10", root if root.name != "cifar-10-batches-py" else root.parent
    if (root / "cifar-100-python").is_dir() or root.name == "cifar-100-python":
        return "cifar100", root if root.name != "cifar-100-python" else root.parent
    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        return "folder", root
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"data folder {root} is empty; put train/ and test/ (or val/) folders with one subfolder per class "
                        "in it, or pass a torchvision CIFAR folder")
    subdirs = [p for p in entries if p.is_dir()]
    if len(subdirs) == 1:  # an archive's single top folder, e.g. data/cifar10/{train,test}
        try:
            return find_layout(subdirs[0])
        except DataError:
            pass
    raise DataError(f"{root} is in no supported layout; it needs train/ and test/ (or val/) folders with one subfolder per "
                    "class, or a torchvision CIFAR folder")


def _list_images(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((split_dir / c).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(f)
                labels.append(i)
    return files, labels, classes


def _content_key(files: list[Path], image_size: int | None) -> str:
    h = hashlib.sha256(str(image_size).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    return Path(os.environ.get("ATC_CACHE_DIR", Path.home() / ".cache" / "atc"))


def _decode(files: list[Path], image_size: int | None, strict: bool) -> tuple[np.ndarray, list[int], list[str]]:
    from PIL import Image, UnidentifiedImageError

    arrays, kept, bad = [], [], []
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if image_size and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
            kept.append(i)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if strict:
                raise DataError(f"corrupt image {f} ({type(exc).__name__}); remove it, or run without --strict-data to skip "
                                "unreadable images") from exc
            bad.append(str(f))
    if arrays and len({a.shape for a in arrays}) > 1:
        raise DataError(f"images in {files[0].parent.parent} differ in size; set the preset's data.image_size to resize them")
    return (np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)), kept, bad


def _load_split(split_dir: Path, image_size: int | None, strict: bool) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    files, labels, classes = _list_images(split_dir)
    if not files:
        raise DataError(f"{split_dir} holds no images; it needs one subfolder per class with image files in it")
    cache = cache_dir() / f"{_content_key(files, image_size)}.pt"
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            blob = blob if all(k in blob for k in ("x", "y", "skipped")) else None
        except Exception:
            blob = None  # an unreadable cache is rebuilt below
        if blob is not None:
            if strict and blob["skipped"]:
                raise DataError(f"corrupt image {blob['skipped'][0]} (one of {len(blob['skipped'])} in {split_dir}); remove it, "
                                "or run without --strict-data to skip unreadable images")
            return blob["x"], blob["y"], classes, blob["skipped"]
    arr, kept, bad = _decode(files, image_size, strict)
    if not kept:
        raise DataError(f"no image in {split_dir} could be decoded; check the files")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([labels[i] for i in kept], dtype=torch.long)
    try:
        fileio.torch_save(cache, {"x": x, "y": y, "skipped": bad})
    except (OSError, OutputError):
        pass  # a read-only or full cache folder only costs the decode next time
    return x, y, classes, bad


def load_image_folder(root: Path, image_size: int | None = None, strict: bool = False) -> ImageData:
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    tx, ty, classes, bad_train = _load_split(root / "train", image_size, strict)
    vx, vy, test_classes, bad_test = _load_split(test_dir, image_size, strict)
    if test_classes != classes:
        raise DataError(f"{root}: train/ and {test_dir.name}/ have different class folders; make them the same")
    return ImageData(root.name, tx, ty, vx, vy, classes, bad_train + bad_test)


def open_dataset(spec: str | os.PathLike, image_size: int | None = None, strict: bool = False) -> ImageData:
    """Load the dataset named by ``spec``: ``digits`` or a folder in a supported layout."""
    if str(spec) == "digits":
        return load_digits(image_size or 16)
    if str(spec) == "shapes":  # generated shapes with object masks (compressor/shapes.py)
        from compressor.shapes import load_shapes

        return load_shapes(image_size or 32)
    kind, root = find_layout(Path(spec).expanduser())
    if kind in ("cifar10", "cifar100"):
        return _load_torchvision_cifar(root, kind == "cifar100")
    return load_image_folder(root, image_size, strict)


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
                 rank: int = 0, world_size: int = 1, channels_last: bool = False):
        self.y = y
        self.batch_size, self.device, self.train, self.augment = batch_size, device, train, augment
        self.seed, self.epoch, self.start_step = seed, 0, 0
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _order(self) -> torch.Tensor:
        n = len(self.y)
        if not self.train:
            idx = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
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

    def _normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class DeviceBatches(Batches):
    """Batches of a device-resident uint8 dataset, augmented and normalised on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, mean, std, device: torch.device,
                 train: bool, augment: Augment = Augment(), seed: int = 0, drop_last: bool | None = None,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False):
        super().__init__(y.to(device), batch_size, mean, std, device, train, augment, seed, drop_last, rank, world_size,
                         channels_last)
        self.x = x.to(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device)
        for step in range(self.start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.x[idx]
            if self.train:
                x = self._augment(x, step)
            yield self._normalise(x), self.y[idx]
        self.start_step = 0

    def _augment(self, x: torch.Tensor, step: int) -> torch.Tensor:
        # One generator per (seed, epoch, step): any batch can be replayed without the ones before it.
        g = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + step)
        b, _, h, w = x.shape
        pad = self.augment.crop_padding
        if pad:
            dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
            dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
            x = _crop(F.pad(x, (pad, pad, pad, pad)), dy, dx, h, w)
        if self.augment.flip:
            flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return x


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample crops of size h×w at offsets (dy, dx), one gather per axis."""
    b, c, hp, wp = padded.shape
    rows = (dy.view(b, 1) + torch.arange(h, device=padded.device)).view(b, 1, h, 1).expand(b, c, h, wp)
    out = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w, device=padded.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return out.gather(3, cols)
