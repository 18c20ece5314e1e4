"""Image folders on disk: the ImageFolder layout (train/ and test/ with one folder per class),
strict or tolerant decoding, and a decode cache keyed by the files' content."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from compressor import fileio
from compressor.data.images import ImageData, with_source
from compressor.errors import DataError, OutputError, shown
from compressor.events import SILENT, Reporter

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
    """Image files of one split, their labels and the class names (one per subfolder, sorted).

    Hidden folders (``.ipynb_checkpoints``, ``.git``) are not classes."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((split_dir / c).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(f)
                labels.append(i)
    return files, labels, classes


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def list_splits(root: Path) -> tuple[Path, tuple[list[Path], list[int], list[str]], tuple[list[Path], list[int], list[str]]]:
    """The test folder and the listing (files, labels, classes) of train/ and test/ (or val/), checked before any decoding.

    Refuses a split without images, a class folder without images (it would become a class no
    image teaches) and class folders that differ between the splits, naming the folders."""
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    listings = []
    for split in (root / "train", test_dir):
        files, labels, classes = _list_images(split)
        if not files:
            raise DataError(f"{split} holds no images; it needs one subfolder per class with image files in it")
        listings.append((files, labels, classes))
    empty = [str(split / c) for split, (_, labels, classes) in zip((root / "train", test_dir), listings)
             for i, c in enumerate(classes) if i not in set(labels)]
    if len(empty) == 1:
        raise DataError(f"class folder {empty[0]} has no images; remove it or add images to it")
    if empty:
        raise DataError(f"class folders {_names(empty)} have no images; remove them or add images to them")
    train_classes, test_classes = listings[0][2], listings[1][2]
    if len(train_classes) == 1 and train_classes == test_classes:
        raise DataError(f"{root} has one class ({shown(train_classes[0])}); a classifier learns nothing from one class (every "
                        "image is it, so top-1 is 100 %), so add at least one more class folder to train/ and "
                        f"{test_dir.name}/")
    if train_classes != test_classes:
        only_train = [c for c in train_classes if c not in test_classes]
        only_test = [c for c in test_classes if c not in train_classes]
        parts = ([f"only in train/: {_names(only_train)}"] if only_train else []) + \
                ([f"only in {test_dir.name}/: {_names(only_test)}"] if only_test else [])
        raise DataError(f"{root}: train/ and {test_dir.name}/ have different class folders ({'; '.join(parts)}); "
                        "make them the same")
    return test_dir, listings[0], listings[1]


def _content_key(files: list[Path], image_size: int | None) -> str:
    # v2: 16-bit images are scaled to 8 bits (v1 clipped them) and the source modes/sizes are stored
    # v3: photos are turned upright by their EXIF orientation, and how many were is stored
    h = hashlib.sha256(f"v3:{image_size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``ATC_CACHE_DIR``, else ``~/.cache/atc`` (an empty
    ``ATC_CACHE_DIR=`` counts as unset: it would mean the current folder)."""
    return Path(os.environ.get("ATC_CACHE_DIR") or Path.home() / ".cache" / "atc")


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def source_channels(im) -> int:
    """Channels of a PIL image as stored: 1 for grayscale (``L``, ``I;16``, ``I``, ``1``), 3 for RGB or a palette, 4 for RGBA."""
    return 3 if im.mode in ("P", "PA") else len(im.getbands())


def to_rgb(im):
    """A PIL image as 8-bit RGB. 16-bit grayscale (``I;16``, and ``I`` read as 16-bit) is scaled to 8 bits
    (value >> 8) first: ``convert("RGB")`` alone clips every value above 255 to white."""
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def new_source_info() -> dict:
    return {"channels": [], "wide": 0, "resized": 0, "sizes": [], "rotated": 0}


EXIF_ORIENTATION = 0x0112


def upright(im):
    """``im`` turned as its EXIF orientation says (as photo viewers show it, and as PIL users expect
    from ``ImageOps.exif_transpose``), and whether it had to be."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still good
        return im, False
    if orientation in (None, 1) or orientation not in range(2, 9):
        return im, False
    return ImageOps.exif_transpose(im), True


def record_source(info: dict, im, resized: bool, rotated: bool = False) -> None:
    info["rotated"] = info.get("rotated", 0) + int(rotated)
    c = source_channels(im)
    if c not in info["channels"]:
        info["channels"] = sorted(info["channels"] + [c])
    info["wide"] += im.mode in SIXTEEN_BIT_MODES
    if resized:
        info["resized"] += 1
        hw = [im.size[1], im.size[0]]
        if hw not in info["sizes"] and len(info["sizes"]) < 2:  # two are enough to know the sizes vary
            info["sizes"].append(hw)


DECODE_REPORT_EVERY = 500  # images between progress updates while decoding


def _decode(files: list[Path], image_size: int | None, strict: bool,
            info: dict | None = None, reporter: Reporter = SILENT) -> tuple[np.ndarray, list[int], list[str]]:
    from PIL import Image, UnidentifiedImageError

    arrays, kept, bad = [], [], []
    for i, f in enumerate(files):
        if i and i % DECODE_REPORT_EVERY == 0:
            reporter.advance(DECODE_REPORT_EVERY)
        try:
            with Image.open(f) as src:
                turned, rotated = upright(src)
                im = to_rgb(turned)
                resize = bool(image_size) and im.size != (image_size, image_size)
                if resize:
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
                if info is not None:
                    record_source(info, src, resize, rotated)
            kept.append(i)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if strict:
                raise DataError(f"corrupt image {f} ({type(exc).__name__}); remove it, or run without --strict-data to skip "
                                "unreadable images") from exc
            bad.append(str(f))
    if arrays and len({a.shape for a in arrays}) > 1:
        raise DataError(f"images in {files[0].parent.parent} differ in size; set the preset's data.image_size to resize them")
    return (np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)), kept, bad


def _load_split(split_dir: Path, image_size: int | None, strict: bool,
                listing: tuple[list[Path], list[int], list[str]] | None = None, reporter: Reporter = SILENT
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str], dict]:
    files, labels, classes = listing or _list_images(split_dir)
    if not files:
        raise DataError(f"{split_dir} holds no images; it needs one subfolder per class with image files in it")
    cache = cache_dir() / f"{_content_key(files, image_size)}.pt"
    if cache.exists():
        try:
            blob = None if fileio.damaged_record(cache) else torch.load(cache, weights_only=True)
        except Exception:
            blob = None  # an unreadable cache is rebuilt below
        blob = blob if cache_fits(blob, len(files), len(classes)) else None
        if blob is not None:
            if strict and blob["skipped"]:
                raise DataError(f"corrupt image {blob['skipped'][0]} (one of {len(blob['skipped'])} in {split_dir}); remove it, "
                                "or run without --strict-data to skip unreadable images")
            return blob["x"], blob["y"], classes, blob["skipped"], blob["info"]
    info = new_source_info()
    reporter.task(f"decoding {len(files):,} images in {split_dir} (once: they are cached in {cache.parent})", len(files))
    try:
        arr, kept, bad = _decode(files, image_size, strict, info, reporter)
    finally:
        reporter.done()
    if not kept:
        raise DataError(f"no image in {split_dir} could be decoded; check the files")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([labels[i] for i in kept], dtype=torch.long)
    try:
        fileio.torch_save(cache, {"x": x, "y": y, "skipped": bad, "info": info})
    except (OSError, OutputError):
        pass  # a read-only or full cache folder only costs the decode next time
    return x, y, classes, bad, info


def cache_fits(blob, files: int, classes: int) -> bool:
    """Whether a decode cache's tensors agree with its header and with the folder it stands for:
    N×3×H×W uint8 images, N labels among the classes, the skipped files' names, and N + skipped =
    the files listed. A cache that does not is decoded again, never trusted."""
    if not isinstance(blob, dict) or not all(k in blob for k in ("x", "y", "skipped", "info")):
        return False
    x, y, skipped, info = blob["x"], blob["y"], blob["skipped"], blob["info"]
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
        return False
    if not (isinstance(y, torch.Tensor) and y.dtype == torch.long and y.dim() == 1 and len(y) == len(x)):
        return False
    if len(y) and not (0 <= int(y.min()) and int(y.max()) < classes):
        return False
    if not (isinstance(skipped, list) and all(isinstance(f, str) for f in skipped) and len(x) + len(skipped) == files):
        return False
    return isinstance(info, dict) and all(k in info for k in new_source_info())


def _merge_info(a: dict, b: dict) -> dict:
    sizes = a["sizes"] + [s for s in b["sizes"] if s not in a["sizes"]]
    return {"channels": sorted(set(a["channels"]) | set(b["channels"])), "wide": a["wide"] + b["wide"],
            "resized": a["resized"] + b["resized"], "sizes": sizes[:2], "rotated": a["rotated"] + b["rotated"]}


def load_image_folder(root: Path, image_size: int | None = None, strict: bool = False, reporter: Reporter = SILENT) -> ImageData:
    test_dir, train_listing, test_listing = list_splits(root)
    tx, ty, classes, bad_train, info_train = _load_split(root / "train", image_size, strict, train_listing, reporter)
    vx, vy, _, bad_test, info_test = _load_split(test_dir, image_size, strict, test_listing, reporter)
    info = _merge_info(info_train, info_test)
    data = ImageData(root.name, tx, ty, vx, vy, classes, bad_train + bad_test)
    data = with_source(data, info["channels"], info["resized"], info["sizes"], info["wide"])
    if info["rotated"]:
        data.notes.append(f"{info['rotated']:,} photo(s) turned upright by their EXIF orientation (as photo viewers show them)")
    return data
