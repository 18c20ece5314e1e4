"""Run the cells of a study (one training per grid point and seed, each with its own folder) in this
process, in local worker processes placed on the GPUs of the node, or as tasks of a Ray cluster.

``run_cells(work, tasks, engine)`` is the one entry point. ``work(payload, context)`` trains one cell
and returns a JSON-able dict; it runs wherever the engine puts it:

- ``Engine()``: one cell after another, in this process.
- ``Engine(jobs=N)``: N worker processes (spawned: CUDA cannot be forked). On a node with G GPUs worker
  k sees only GPU k mod G (``CUDA_VISIBLE_DEVICES``), so runs land on 0, 1, …, G−1, 0, …; with
  ``gpus_per_run=F`` at most ⌊1/F⌋ of them share one GPU (``gpu_slots`` is the rule, a pure function).
- ``Engine(ray="local" | ADDRESS)``: each cell a Ray task with ``num_gpus=F`` and ``num_cpus`` = the
  run's CPUs, on the cluster at ADDRESS or on a Ray started for this run (loopback only, no dashboard,
  no usage report). Ray is an optional extra (``pip install 'atc[ray]'``).

Files every cell needs (the teacher checkpoint) are read once by the caller's process and handed over
as bytes with their SHA-256: once per worker process, or with Ray one ``ray.put`` that every task
references. Each cell sees them as files in a private temporary folder, written after the hash was
checked, so every cell trains against the same teacher even if the original file changes meanwhile.
Data is never shipped: a payload names where the data is and every worker reads it there.

A cell that finishes writes ``cell.json`` into its folder (from the worker, atomically). With
``run_cells(..., resume=True)`` a cell with a ``cell.json`` is not run again (its recorded value is returned),
and a half-done one is run again with ``context.resume`` set so that it continues from its own saved
state; without it, a cell folder that already holds anything is refused. A cell that raises is
reported with its error (the traceback goes to ``error.txt`` in its folder) and the others go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from compressor import fileio
from compressor.errors import AtcError, ConfigError, Interrupted, OutputError
from compressor.events import SILENT, Reporter

CELL_FILE = "cell.json"
ERROR_FILE = "error.txt"
RAY_EXTRA = "pip install 'atc[ray]'"


# ------------------------------------------------------------------------------------------ options

@dataclass(frozen=True)
class Engine:
    """Where and how many cells run at once.

    ``jobs``: runs at once (None: 1 without Ray; with Ray, as many as the cluster's free resources fit).
    ``gpus_per_run``: the share of one GPU a run takes, in (0, 1] (None: 1 when there are GPUs, or the
    share that spreads ``jobs`` evenly over them). ``ray``: None (no Ray), ``"local"`` (a Ray started for
    this run) or a cluster address (``auto``, ``HOST:6379``, ``ray://HOST:10001``). ``cpus_per_run``:
    CPU cores each run reserves (Ray's ``num_cpus``) and the torch threads it computes with (None: this
    process's own thread count, in this process and in worker processes; 1 CPU on Ray). On the CPU the
    thread count changes the rounding, so results agree across engines when the threads do.
    ``gpus``: GPUs of this node (None: ask torch; 0 when the cells train on the CPU).
    """

    jobs: int | None = None
    gpus_per_run: float | None = None
    ray: str | None = None
    cpus_per_run: int | None = None
    gpus: int | None = None

    def __post_init__(self) -> None:
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}")
        if self.gpus_per_run is not None and not 0 < self.gpus_per_run <= 1:
            raise ConfigError(f"--gpus-per-run must be above 0 and at most 1, got {self.gpus_per_run:g}: a sweep run "
                              "trains on one GPU (use atc train --nproc to spread one run over several)")
        if self.cpus_per_run is not None and self.cpus_per_run < 1:
            raise ConfigError(f"CPUs per run must be at least 1, got {self.cpus_per_run}")

    @property
    def kind(self) -> str:
        if self.ray is not None:
            return "ray"
        return "processes" if (self.jobs or 1) > 1 else "sequential"


@dataclass(frozen=True)
class Task:
    """One cell: ``key`` names it (unique), ``folder`` is where it writes (its ``cell.json`` marks it
    finished; None: the work keeps its own record and the runner neither resumes nor refuses it),
    ``payload`` is the picklable argument of the work, ``after`` the keys of cells that must finish first."""

    key: str
    folder: Path | None
    payload: Any = None
    after: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What became of one cell. ``status``: done (trained now), reused (finished earlier, ``--resume``),
    failed (raised; ``error`` says what), stopped (Ctrl-C or SIGTERM; its state is saved), skipped (a cell
    it needs did not finish) or not run (no new cells were started any more)."""

    key: str
    status: str
    value: dict[str, Any] | None = None
    error: str | None = None
    seconds: float | None = None
    where: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "reused")


@dataclass(frozen=True)
class Blob:
    """A file's bytes, read once, with the SHA-256 that every receiver checks."""

    name: str
    sha256: str
    data: bytes = field(repr=False)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Blob:
        data = Path(path).read_bytes()
        return cls(Path(path).name, hashlib.sha256(data).hexdigest(), data)

    def check(self) -> None:
        got = hashlib.sha256(self.data).hexdigest()
        if got != self.sha256:
            raise OutputError(f"the copy of {self.name} a worker received has SHA-256 {got[:12]}…, not {self.sha256[:12]}… as read; "
                              "run the sweep again")


@dataclass
class CellContext:
    """What a running cell gets besides its payload: its key and folder, its shared files (``path(name)``),
    whether it may continue from a saved state (``resume``), the torch threads it runs with, a reporter
    (the caller's in this process, silent elsewhere) and a dict that lives as long as its worker process
    (to load a teacher once for several cells; key it by the file's ``sha256``)."""

    key: str
    folder: Path | None
    resume: bool
    threads: int | None  # torch threads the cell runs with (None: as this process has them)
    blobs: Mapping[str, Blob]
    scratch: Path  # a private temporary folder, removed when the cell ends
    cache: dict[Any, Any]
    reporter: Reporter = SILENT

    def sha256(self, name: str) -> str:
        return self._blob(name).sha256

    def path(self, name: str) -> Path:
        """The shared file ``name`` as a file of this cell's own, written from the checked bytes."""
        target = self.scratch / self._blob(name).name
        if not target.exists():
            blob = self._blob(name)
            blob.check()
            target.write_bytes(blob.data)
        return target

    def _blob(self, name: str) -> Blob:
        if name not in self.blobs:
            raise KeyError(f"no shared file {name!r}; the runner was given {sorted(self.blobs)}")
        return self.blobs[name]


Work = Callable[[Any, CellContext], dict]


# ---------------------------------------------------------------------------------------- placement

def gpu_slots(jobs: int, gpus: int, gpus_per_run: float | None = None) -> list[int | None]:
    """The GPU index each of ``jobs`` worker slots sees (None: no GPU): slot k gets GPU k mod ``gpus``, and at
    most ⌊1/F⌋ slots share a GPU when each run takes ``gpus_per_run`` = F of one (so fewer slots than ``jobs``
    when they do not fit). Without F the slots spread evenly: ⌈jobs / gpus⌉ per GPU at most."""
    if gpus <= 0:
        return [None] * jobs
    per_gpu = -(-jobs // gpus) if gpus_per_run is None else int(1 / gpus_per_run + 1e-9)
    return [k % gpus for k in range(min(jobs, gpus * per_gpu))]


def visible_device(index: int, parent: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker on GPU ``index`` of those this process sees (``parent``: this
    process's own ``CUDA_VISIBLE_DEVICES``, whose entries may be ids or UUIDs)."""
    if parent is None or not parent.strip():
        return str(index)
    return [d.strip() for d in parent.split(",") if d.strip()][index]


def _own_threads() -> int:
    import torch

    return torch.get_num_threads()


def count_gpus() -> int:
    """CUDA devices this process sees (0 without a CUDA build or driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def share_per_run(engine: Engine, gpus: int) -> float:
    """The GPU share each run takes: the option, else 1 where there are GPUs and the runs fit one per GPU, else
    the share that spreads them evenly; 0 without GPUs."""
    if gpus <= 0:
        return 0.0
    if engine.gpus_per_run is not None:
        return engine.gpus_per_run
    jobs = engine.jobs or 1
    return 1.0 / -(-jobs // gpus) if jobs > gpus else 1.0


# ----------------------------------------------------------------------------------- cell records

def read_record(folder: Path, key: str) -> dict[str, Any] | None:
    """The finished cell's record in ``folder`` (None when there is none), checked field by field."""
    path = folder / CELL_FILE
    if not path.is_file():
        return None
    fix = f"delete {path} to train that cell again"
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path} is unreadable ({type(exc).__name__}); {fix}") from None
    if not isinstance(record, dict):
        raise OutputError(f"{path} holds a {type(record).__name__}, not a cell record; {fix}")
    for name, kind in (("key", str), ("value", dict)):
        if not isinstance(record.get(name), kind):
            raise OutputError(f"{path}: field {name!r} is missing or not a {kind.__name__}; {fix}")
    if record["key"] != key:
        raise OutputError(f"{path} records cell {record['key']!r}, not {key!r}: two cells share a folder; {fix}")
    return record


def _write_record(folder: Path, key: str, value: dict[str, Any], seconds: float, where: str) -> None:
    fileio.write_json(folder / CELL_FILE, {"cell_version": 1, "key": key, "value": value, "seconds": round(seconds, 3),
                                          "where": where, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    (folder / ERROR_FILE).unlink(missing_ok=True)


def _refuse_earlier_runs(tasks: Sequence[Task]) -> None:
    for t in tasks:
        if t.folder is not None and t.folder.is_dir() and any(t.folder.iterdir()):
            raise OutputError(f"{t.folder} already holds a run of cell {t.key!r}; pass --resume to continue the study "
                              "(finished cells are kept, half-done ones continue from their saved state) or choose another --out")


# ------------------------------------------------------------------------------- inside the worker

_PROCESS_CACHE: dict[Any, Any] = {}  # per process: what cells of one worker share (a loaded teacher)
_SLOT: dict[str, Any] = {}  # per worker process of the local pool: its blobs and threads


def _where() -> str:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()} pid {os.getpid()}" + (f" gpu {devices}" if devices else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, AtcError) and first else f"{type(exc).__name__}: {first}".rstrip(": ")


def runner_cache() -> dict[Any, Any]:
    """This process's cache that cells see as ``context.cache`` (a caller may seed it with what it loaded)."""
    return _PROCESS_CACHE


def execute(work: Work, task: Task, blobs: Mapping[str, Blob], resume: bool, threads: int | None,
            reporter: Reporter = SILENT) -> dict[str, Any]:
    """Run one cell where this is called; never raises for the cell's own errors: returns
    ``{"status": "done", "value": …}``, or ``failed``/``stopped`` with the error line."""
    began = time.time()
    folder = task.folder
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="atc-cell-") as tmp, _torch_threads(threads):
            ctx = CellContext(task.key, folder, resume, threads, blobs, Path(tmp), _PROCESS_CACHE, reporter)
            value = work(task.payload, ctx)
        if not isinstance(value, dict):
            raise TypeError(f"a cell's work must return a dict, got {type(value).__name__}")
        json.dumps(value)  # the record must be writable before the cell counts as finished
    except (Interrupted, KeyboardInterrupt) as exc:
        return {"status": "stopped", "error": _one_line(exc), "seconds": time.time() - began, "where": _where()}
    except Exception as exc:  # a failed cell is reported, and the others go on
        if folder is not None:
            try:
                fileio.write_text(folder / ERROR_FILE, traceback.format_exc())
            except (OSError, AtcError):
                pass
        return {"status": "failed", "error": _one_line(exc), "seconds": time.time() - began, "where": _where()}
    seconds = time.time() - began
    if folder is not None:
        _write_record(folder, task.key, value, seconds, _where())
    return {"status": "done", "value": value, "seconds": seconds, "where": _where()}


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads where torch is loaded already (a worker that imports it later
    reads ``OMP_NUM_THREADS``, which its engine set)."""
    if threads is None or "torch" not in sys.modules:
        yield
        return
    from compressor.device import torch_threads

    with torch_threads(threads):
        yield


def _slot_init(env: dict[str, str], blobs: Mapping[str, Blob], threads: int) -> None:
    """A local worker process starts: pin its GPU before anything touches CUDA, take the blobs once."""
    os.environ.update(env)  # torch reads OMP_NUM_THREADS when the cell imports it, CUDA its devices when first used
    _SLOT.update(blobs=dict(blobs), threads=threads)
    # Idle workers let Ctrl-C pass (the driver handles it); training installs its own handler, which saves the state.
    # A handler rather than SIG_IGN: an ignored signal stays ignored in the programs a cell starts.
    signal.signal(signal.SIGINT, _ignore)


def _ignore(signum, frame) -> None:
    pass


def _slot_execute(work: Work, task: Task, resume: bool) -> dict[str, Any]:
    return execute(work, task, _SLOT["blobs"], resume, _SLOT["threads"])


def _ray_execute(work: Work, task: Task, blob_refs: dict[str, tuple[str, str, Any]], resume: bool, threads: int) -> dict[str, Any]:
    import ray

    # Ray has set CUDA_VISIBLE_DEVICES to the task's GPU and OMP_NUM_THREADS to its num_cpus.
    blobs = {key: Blob(name, sha, ray.get(ref)) for key, (name, sha, ref) in blob_refs.items()}
    return execute(work, task, blobs, resume, threads)


# --------------------------------------------------------------------------------------- executors

class _Sequential:
    """Cells one after another in this process."""

    def __init__(self, work: Work, blobs: Mapping[str, Blob], engine: Engine, resume: bool, reporter: Reporter):
        self.work, self.blobs, self.engine, self.resume, self.reporter = work, blobs, engine, resume, reporter
        self.capacity = 1
        self.ready: list[tuple[Task, dict[str, Any]]] = []

    def submit(self, task: Task) -> None:
        self.ready.append((task, execute(self.work, task, self.blobs, self.resume, self.engine.cpus_per_run, self.reporter)))

    def wait(self) -> list[tuple[Task, dict[str, Any]]]:
        out, self.ready = self.ready, []
        return out

    def stop(self, forward: bool) -> None:
        pass

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Processes:
    """One single-worker process pool per slot, so that every slot keeps its GPU (and its loaded teacher)
    and a worker that dies takes only its own cell with it."""

    def __init__(self, work: Work, blobs: Mapping[str, Blob], engine: Engine, resume: bool, reporter: Reporter):
        import multiprocessing

        self.work, self.blobs, self.engine, self.resume = work, blobs, engine, resume
        gpus = count_gpus() if engine.gpus is None else engine.gpus
        self.slots = gpu_slots(engine.jobs or 1, gpus, engine.gpus_per_run)
        self.capacity = len(self.slots)
        parent = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.threads = engine.cpus_per_run or _own_threads()  # as many as a cell in this process would have
        self.envs = [{"OMP_NUM_THREADS": str(self.threads)} |
                     ({"CUDA_VISIBLE_DEVICES": visible_device(g, parent)} if g is not None else {}) for g in self.slots]
        self.context = multiprocessing.get_context("spawn")
        self.pools: dict[int, ProcessPoolExecutor] = {}
        self.running: dict[Future, tuple[int, Task]] = {}
        placed = ", ".join(f"GPU {g}" for g in self.slots) if gpus else "the CPU"
        reporter.info(f"{self.capacity} worker process(es) at once, on {placed}" +
                      (f" (--jobs {engine.jobs} asked for more than fit at {engine.gpus_per_run:g} GPU per run)"
                       if self.capacity < (engine.jobs or 1) else ""))

    def _pool(self, slot: int) -> ProcessPoolExecutor:
        if slot not in self.pools:
            self.pools[slot] = ProcessPoolExecutor(1, mp_context=self.context, initializer=_slot_init,
                                                   initargs=(self.envs[slot], self.blobs, self.threads))
        return self.pools[slot]

    def submit(self, task: Task) -> None:
        busy = {slot for slot, _ in self.running.values()}
        slot = next(s for s in range(self.capacity) if s not in busy)
        self.running[self._pool(slot).submit(_slot_execute, self.work, task, self.resume)] = (slot, task)

    def wait(self) -> list[tuple[Task, dict[str, Any]]]:
        done, _ = wait_futures(list(self.running), return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            slot, task = self.running.pop(fut)
            try:
                out.append((task, fut.result()))
            except BrokenProcessPool:  # the worker died (a crash, the OOM killer): only this cell is lost
                self.pools.pop(slot).shutdown(wait=False)
                out.append((task, {"status": "failed", "error": "its worker process died (killed, or crashed outside Python)"}))
            except Exception as exc:  # the payload or the result could not cross to the process
                out.append((task, {"status": "failed", "error": _one_line(exc)}))
        return out

    def _signal_workers(self, signum: int) -> None:
        for pool in self.pools.values():
            for proc in list((getattr(pool, "_processes", None) or {}).values()):  # the executor's own record of its worker
                if proc.is_alive():
                    os.kill(proc.pid, signum)

    def stop(self, forward: bool) -> None:
        """A Ctrl-C in the terminal reached the workers too; a SIGTERM to the driver alone is passed on
        (training saves its state on either)."""
        if forward:
            self._signal_workers(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_workers(signal.SIGKILL)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


def import_ray(local: bool = False):
    """Ray, or the one-line error that says how to install it. ``local``: Ray is for this machine alone, so it
    is told so before it is imported (it reads these settings once, at import; a user's own settings win):
    bound to the loopback address, and no usage report."""
    if local:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's switch for "this node only": 127.0.0.1
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


def start_local_ray(cpus: int | None = None, gpus: int | None = None):
    """A Ray for this machine alone: loopback only (see ``import_ray``), no dashboard, no usage report. Ray's
    token authentication stays on; its note that it is on is not repeated on every sweep."""
    import logging

    ray = import_ray(local=True)
    note = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = note.level
    note.setLevel(logging.ERROR)
    try:
        return ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    finally:
        note.setLevel(level)


class _Ray:
    """Cells as Ray tasks: ``num_gpus`` = the run's GPU share, ``num_cpus`` = its CPUs; the blobs put once."""

    def __init__(self, work: Work, blobs: Mapping[str, Blob], engine: Engine, resume: bool, reporter: Reporter):
        self.ray = ray = import_ray(local=engine.ray == "local")
        self.work, self.engine, self.resume = work, engine, resume
        self.owned = not ray.is_initialized()
        if self.owned and engine.ray == "local":
            start_local_ray(gpus=0 if engine.gpus == 0 else None)
        elif self.owned:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                ray.init(address=engine.ray, configure_logging=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot reach the Ray cluster at {engine.ray!r} ({_one_line(exc)}); start it with "
                                  "`ray start --head` or pass --ray with no address for a Ray on this machine") from None
        resources = ray.cluster_resources()
        cluster_gpus = 0 if engine.gpus == 0 else int(resources.get("GPU", 0))
        self.share = share_per_run(engine, cluster_gpus)
        self.capacity = engine.jobs or 1 << 30
        self.refs = {k: (b.name, b.sha256, ray.put(b.data)) for k, b in blobs.items()}  # once, whatever the number of tasks
        self.cpus = engine.cpus_per_run or 1
        self.remote = ray.remote(_ray_execute).options(num_cpus=self.cpus, num_gpus=self.share)
        self.running: dict[Any, Task] = {}
        reporter.info(f"Ray at {ray.get_runtime_context().gcs_address}: {resources.get('CPU', 0):g} CPUs, {cluster_gpus} GPUs; "
                      f"each run takes {self.cpus} CPU(s)" + (f" and {self.share:g} GPU" if self.share else ""))

    def submit(self, task: Task) -> None:
        self.running[self.remote.remote(self.work, task, self.refs, self.resume, self.cpus)] = task

    def wait(self) -> list[tuple[Task, dict[str, Any]]]:
        done, _ = self.ray.wait(list(self.running), num_returns=1)
        out = []
        for ref in done:
            task = self.running.pop(ref)
            try:
                out.append((task, self.ray.get(ref)))
            except Exception as exc:  # the task's node or worker was lost (Ray already retried it)
                out.append((task, {"status": "failed", "error": f"Ray lost the task: {_one_line(exc)}"}))
        return out

    def stop(self, forward: bool) -> None:
        for ref in self.running:  # Ray's workers are not in the terminal's process group: always pass it on
            self.ray.cancel(ref)

    def kill(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


# -------------------------------------------------------------------------------------- the runner

def run_cells(work: Work, tasks: Sequence[Task], engine: Engine = Engine(), *, resume: bool = False,
              shared: Mapping[str, Blob] | None = None, reporter: Reporter = SILENT,
              on_outcome: Callable[[Outcome], None] | None = None, keep_launching: Callable[[], bool] | None = None,
              on_start: Callable[[Task], None] | None = None) -> list[Outcome]:
    """Run every task not finished yet; return one ``Outcome`` per task, in the order given.

    ``resume``: a task whose folder holds a ``cell.json`` is reused, the others run with ``context.resume``
    set (they continue from what they saved); without it a task folder that holds anything is refused.

    ``shared``: files every cell reads (``context.path(name)``), e.g. ``{"teacher": Blob.read(path)}``.
    ``on_start`` is called (here) as each cell is launched, ``on_outcome`` as each one ends (to rewrite a
    results file); once ``keep_launching()`` returns False no new cell starts. Ctrl-C (or SIGTERM) stops the running cells, which save their
    state, and is raised again once they have; ``--resume`` continues from there."""
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("run_cells: task keys must be unique")
    folders = [str(t.folder) for t in tasks if t.folder is not None]
    if len(set(folders)) != len(folders):
        raise ValueError("run_cells: two tasks share a folder")
    if not resume:
        _refuse_earlier_runs(tasks)
    outcomes: dict[str, Outcome] = {}
    todo: list[Task] = []
    for t in tasks:
        record = read_record(t.folder, t.key) if resume and t.folder is not None else None
        if record is not None:
            outcomes[t.key] = Outcome(t.key, "reused", record["value"], seconds=record.get("seconds"), where=record.get("where"))
        else:
            todo.append(t)
    if outcomes:
        reporter.info(f"{len(outcomes)} of {len(tasks)} cells finished earlier (reused); {len(todo)} to run")
    for o in outcomes.values():
        _notify(on_outcome, o)
    if todo:
        hooks = _Hooks(on_start, on_outcome, keep_launching)
        _schedule(work, todo, engine, resume, dict(shared or {}), reporter, outcomes, hooks, len(tasks))
    return [outcomes[k] for k in keys]


@dataclass(frozen=True)
class _Hooks:
    on_start: Callable[[Task], None] | None
    on_outcome: Callable[[Outcome], None] | None
    keep_launching: Callable[[], bool] | None


def _notify(on_outcome: Callable[[Outcome], None] | None, outcome: Outcome) -> None:
    if on_outcome is not None:
        on_outcome(outcome)


def _make_executor(work: Work, blobs: dict[str, Blob], engine: Engine, resume: bool, reporter: Reporter):
    kind = {"ray": _Ray, "processes": _Processes, "sequential": _Sequential}[engine.kind]
    return kind(work, blobs, engine, resume, reporter)


def _schedule(work: Work, todo: list[Task], engine: Engine, resume: bool, blobs: dict[str, Blob], reporter: Reporter,
              outcomes: dict[str, Outcome], hooks: _Hooks, total: int) -> None:
    """Launch ready cells (every ``after`` cell finished) while the executor has room, in the order given;
    record each result as it arrives."""
    known = {t.key for t in todo} | set(outcomes)
    for t in todo:
        if missing := [d for d in t.after if d not in known]:
            raise ValueError(f"run_cells: {t.key!r} waits for {missing[0]!r}, which is not a task")
    executor = _make_executor(work, blobs, engine, resume, reporter)
    pending, running = list(todo), set()

    def record(task: Task, result: dict[str, Any], status: str | None = None) -> None:
        o = Outcome(task.key, status or result["status"], result.get("value"), result.get("error"), result.get("seconds"),
                    result.get("where"))
        outcomes[o.key] = o
        running.discard(o.key)
        reporter.info(f"[{len(outcomes)}/{total}] {o.key}: " + _describe(o))
        _notify(hooks.on_outcome, o)

    stop: list[int] = []  # the signal that stopped the study, once one did
    try:
        with _SigtermAsInterrupt():
            while pending or running:
                launching = not stop and (hooks.keep_launching is None or hooks.keep_launching())
                for t in list(pending):
                    if lost := [d for d in t.after if d in outcomes and not outcomes[d].finished]:
                        pending.remove(t)
                        record(t, {"status": "skipped", "error": f"needs {lost[0]!r}, which did not finish"})
                    elif launching and len(running) < executor.capacity and all(d in outcomes for d in t.after):
                        pending.remove(t)
                        running.add(t.key)
                        if hooks.on_start is not None:
                            hooks.on_start(t)
                        executor.submit(t)
                if not running:
                    break
                for task, result in executor.wait():
                    record(task, result)
                    if result["status"] == "stopped":  # the cell caught the Ctrl-C itself (in this process, say)
                        stop[:] = [signal.SIGINT]
    except KeyboardInterrupt as exc:
        stop[:] = [signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT]
        reporter.info(f"stopping: the {len(running)} running cell(s) save their state")
        executor.stop(forward=isinstance(exc, _Terminated))
        try:
            while running:
                for task, result in executor.wait():
                    record(task, result, "stopped" if result["status"] == "failed" else None)
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait any longer
            executor.kill()
    finally:
        executor.close()
    for t in pending:  # the launching stopped, or a study was interrupted
        record(t, {"status": "not run", "error": "stopped before it started" if stop else "no new cells were started"})
    if stop:
        done = sum(o.finished for o in outcomes.values())
        raise Interrupted(f"stopped by {signal.Signals(stop[0]).name}: {done} of {total} cells finished, the running ones saved "
                          "their state; run the same command with --resume to continue", stop[0])


def _describe(o: Outcome) -> str:
    took = f" in {o.seconds:.1f} s" if o.seconds is not None else ""
    where = f" ({o.where})" if o.where else ""
    if o.status == "done":
        return f"done{took}{where}"
    if o.status == "failed":
        return f"FAILED{took}{where}: {o.error}"
    return f"{o.status}: {o.error}" if o.error else o.status


class _Terminated(KeyboardInterrupt):
    """SIGTERM reached the driver (not its workers, unlike a Ctrl-C in the terminal)."""


class _SigtermAsInterrupt:
    """While cells run, SIGTERM to the driver stops them the way Ctrl-C does (their state is saved)."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise _Terminated

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False
