"""TODO docstring."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import numpy as np
import torch
from compressor import fileio
from compressor.errors import DataError, OutputError
from compressor.data.images import ImageData



IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}



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
