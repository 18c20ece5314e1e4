"""Writing files: atomic writes (a temporary file in the target's folder, then ``os.replace``), the
lock on an output folder, and the output-folder policy (what may be written where, and when an
existing output is refused).

An interrupted write leaves the previous file (or nothing) in place, never a partial one.
Temporary files are named ``.<target>.<pid>.<random>.tmp<suffix>``; one left behind by a
process that was killed (SIGKILL, power loss) is removed by the next write of the same target.
A full disk or an unwritable folder surfaces as an ``OutputError`` that names the file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from compressor.errors import OutputError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def output_error(exc: OSError, target: str | os.PathLike) -> OutputError | None:
    """The one-line ``OutputError`` for a full disk or an unwritable folder; None for other errors."""
    if exc.errno in _NO_SPACE:
        return OutputError(f"no space left on the device while writing {target}; free some space and run the command again")
    if exc.errno in _NOT_WRITABLE:
        return OutputError(f"cannot write {target} ({os.strerror(exc.errno).lower()}); choose a folder you can write to")
    return None


def check_writable(target: str | os.PathLike) -> None:
    """Fail now, in one line, if ``target`` (a file or folder, existing or not) could not be written:
    a probe file is created and removed in the nearest folder that exists. Cheaper than finding out
    after an hour of training."""
    folder = Path(target)
    while not folder.is_dir():
        if folder.exists() or folder.parent == folder:  # a file where a folder is needed: the caller says so
            return
        folder = folder.parent
    try:
        _remove_stale(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f"{PROBE_PREFIX}{os.getpid()}-"):
            pass
    except OSError as exc:
        raise (output_error(exc, target) or OutputError(f"cannot write {target} ({exc.strerror}); choose a folder you can write to")) from None


LOCK_NAME = ".atc.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while a run writes into it, so two runs started on the same
    ``--out`` cannot mix their files; the second one fails at once. The lock is the kernel's (flock),
    so a killed run never leaves a stale lock behind, and the lock file is removed when the run ends
    (a file that a run killed outright leaves holds no lock and is taken over by the next run)."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"another atc run (pid {holder}) is writing into {folder}; wait for it to finish or choose "
                              "another --out") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder before us removed the file we locked; lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock: a run waiting on this file sees it gone and retries
        os.close(fd)  # closing releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ---------------------------------------------------------------- output-folder policy


def check_not_dangling(out: Path) -> None:
    """A symbolic link whose target is gone: writing through it would fail late (or replace the link),
    so say so before any work."""
    if out.is_symlink() and not out.exists():
        raise OutputError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; create it, remove the "
                          "link, or pass another --out")


def prepare_output(out_dir: str | os.PathLike, overwrite: bool = False, resume: bool = False, create: bool = True) -> Path:
    """Refuse a non-empty ``out_dir`` unless the user said to overwrite or resume into it.

    ``create=False`` only checks, so that a run failing on its inputs leaves no empty folder behind.
    """
    out = Path(out_dir)
    check_not_dangling(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    check_writable(out)
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not (overwrite or resume):
        raise OutputError(f"--out {out} is not empty; pass --overwrite to replace its files, --resume to continue, or another folder")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def check_file_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """A single output file (``atc export --out``): not a folder, not a dangling link, not an existing
    file unless told to overwrite it, and writable; checked before any work."""
    path = Path(path)
    check_not_dangling(path)
    if path.is_dir():
        raise OutputError(f"--out {path} is a folder; pass the file to write, e.g. {path / 'model.onnx'}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    check_writable(path)


@contextlib.contextmanager
def kept_only_if_used(folder: str | os.PathLike) -> Iterator[Path]:
    """``folder``, created if missing; when the block fails before anything was written into a folder
    it created, the empty folder is removed again (a run refused at its first batch leaves nothing)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # leaf first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for path in created:
            try:
                path.rmdir()  # only succeeds when it is empty
            except OSError:
                break
        raise


def state_dir_for(checkpoint: str | os.PathLike) -> Path:
    """Where the training state of the run that writes ``checkpoint`` lives until it finishes."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".state")


def check_train_output(out: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse to replace a checkpoint or an unfinished run's state unless told to."""
    out = Path(out)
    check_not_dangling(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; pass the checkpoint file to write, e.g. {out / 'model.pt'}")
    check_writable(out)
    if out.exists() and not (overwrite or resume):
        raise OutputError(f"{out} exists; pass --overwrite to replace it, --resume to continue its run, or another --out")
    state = state_dir_for(out)
    if not out.exists() and state.is_dir() and any(state.iterdir()) and not (overwrite or resume):
        raise OutputError(f"{state} holds the state of an unfinished run; pass --resume to continue it, --overwrite to start again, "
                          "or another --out")


# ---------------------------------------------------------------- atomic writes


PROBE_PREFIX = ".atc-probe-"
SCRATCH_PREFIX = "atc-scratch-"


def _stale_pid(name: str, target_name: str | None) -> int | None:
    """The process id in the name of a temporary atc made, or None for other names: ``.<target>.<pid>.<random>.tmp…``
    (also nested, ``..<target>.<pid>…``, from writers that once wrote a temporary through another),
    ``.atc-probe-<pid>-…`` (writability probes) and ``atc-scratch-<pid>-…`` (scratch folders)."""
    if target_name is not None:
        m = re.match(r"\.+" + re.escape(target_name) + r"\.(\d+)\.[A-Za-z0-9_]+\.tmp", name)
        if m:
            return int(m.group(1))
    m = re.match(re.escape(PROBE_PREFIX) + r"(\d+)-", name) or re.match(re.escape(SCRATCH_PREFIX) + r"(\d+)-", name)
    return int(m.group(1)) if m else None


def _remove_stale(folder: Path, target_name: str | None = None) -> None:
    """Delete temporaries in ``folder`` left by processes that no longer run (killed mid-write)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            pid = _stale_pid(entry.name, target_name)
            if pid is None or pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
            except OSError:  # alive but another user's: leave it
                pass


def _remove_stale_temporaries(target: Path) -> None:
    _remove_stale(target.parent, target.name)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder (in the system's temporary directory) named so that one left by a killed
    run is removed by the next run: ``atc-scratch-<pid>-<random>``."""
    base = Path(tempfile.gettempdir())
    _remove_stale(base)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as tmp:
        yield Path(tmp)


class interruptible:
    """Inside, SIGTERM interrupts as Ctrl-C does (``KeyboardInterrupt``), so every ``finally`` runs:
    atomic writes remove their temporaries and scratch folders go. ``signum`` is the signal that
    arrived (None: none, or Ctrl-C before the handler saw it). Outside the main thread it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._old: Any = None

    def _handle(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt

    def __enter__(self) -> "interruptible":
        import signal

        try:
            self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in (self._old or {}).items():
            signal.signal(sig, old)


def _mode_for(target: Path) -> int:
    """The replaced file's permissions, or what ``open(..., "w")`` would give a new file."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        pass
    umask = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    ``suffix`` is the temporary's last extension, for writers that look at it (matplotlib, onnx).
    The file gets the permissions a plain ``open`` would give it (or the replaced file's).
    """
    target = Path(target)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp" + suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reaches the disk before the rename makes it visible
        finally:
            os.close(fd)
        os.chmod(tmp, _mode_for(target))  # mkstemp's 0600 would make every output private
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        mapped = output_error(exc, target)
        if mapped is not None:
            raise mapped from exc
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(target: str | os.PathLike, record: dict) -> None:
    """Append one JSON line. Rewrites the file atomically so a crash never leaves half a line."""
    target = Path(target)
    old = target.read_bytes() if target.exists() else b""
    write_bytes(target, old + (json.dumps(record) + "\n").encode("utf-8"))


def damaged_record(path: str | os.PathLike) -> str | None:
    """The first record of a zip archive (torch's checkpoint format) whose bytes fail their CRC-32,
    or None when every record checks out or the file is no zip (legacy torch files carry no
    checksum). torch itself reads tensors without checking, so a flipped byte would load silently.
    It reads the whole file once; a 36 MB WRN-40-4 checkpoint takes about 30 ms (docs/reliability.md)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except zipfile.BadZipFile as exc:
        # a zip whose directory is readable but a record header is not: damaged too
        return None if not zipfile.is_zipfile(path) else f"(archive: {exc})"
    except (OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as exc:
        return f"(archive: {type(exc).__name__})" if zipfile.is_zipfile(path) else None


def torch_save(target: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically. The bytes are built in memory first: torch's own file writer turns
    a full disk into a RuntimeError without an errno, a plain write reports ENOSPC."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(target, buffer.getbuffer())
