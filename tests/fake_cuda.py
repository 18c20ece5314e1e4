"""A fake of the ``torch.cuda`` graph API that runs on the CPU, for tests of code only a GPU runs.

``install(monkeypatch)`` replaces ``torch.cuda.CUDAGraph``, ``graph``, ``graph_pool_handle``, ``Stream``,
``current_stream``, ``stream``, ``synchronize``, ``Event``, ``empty_cache`` and
``is_current_stream_capturing`` and lets ``compressor.distill.step`` capture on the CPU. It behaves
like PyTorch 2.14's in what the training step depends on:

- **Capture records without running.** Inside ``torch.cuda.graph`` every aten op is recorded (a
  ``TorchDispatchMode``) and executed to get its outputs, but every tensor that existed before the
  capture and is written by an op is put back at the end, and so is the CPU RNG: after capture the
  weights, optimizer state, BN statistics and meter are as before, as on a GPU. Values read as host
  numbers inside a capture (``.item()``, ``float(t)``, ``bool(t)``, ``torch.equal``, ``nonzero``) raise
  as a capturing stream does.
- **Replay does the captured work on the captured tensors.** ``replay()`` re-runs the recorded ops with
  the arguments they had at capture: Python numbers are baked in (a float learning rate or β stays
  what it was at capture, as in a real graph), tensors are the same objects (their current values
  are read, in-place ops write them), and each op's fresh outputs are copied into the tensors it
  produced at capture (static memory). A tensor the run replaced after capture is not seen.
- **Memory pools.** ``graph_pool_handle()`` is a new id; the first capture into it creates the pool,
  later ones share it while one of its graphs lives. When its last graph is gone the pool stays
  registered with a use count of 0 (something allocated inside a capture survives, as cuBLAS's
  workspace does), and capturing into it again raises the caching allocator's
  ``it->second->use_count > 0 INTERNAL ASSERT FAILED`` error.
- **Streams.** One default stream; ``torch.cuda.stream(s)`` sets the current stream and restores the
  previous one; capture on the default stream raises.

``FakeCuda`` (the returned object) records captures (graph, pool, stream), replays, pools, the streams
entered and the current stream, for tests to assert on.
"""

from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

USE_COUNT_ASSERT = ('it->second->use_count > 0 INTERNAL ASSERT FAILED at "/pytorch/c10/cuda/CUDACachingAllocator.cpp":2630, '
                    "please report a bug to PyTorch.")
CAPTURE_SYNC = "CUDA error: operation not permitted when stream is capturing"

# Ops that read a device value on the host (a synchronisation a capturing stream refuses).
_HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2"}
# Ops that write arguments their schema does not mark as written: BatchNorm's running statistics.
_UNMARKED_WRITES = {"native_batch_norm": (3, 4), "_batch_norm_impl_index": (3, 4), "cudnn_batch_norm": (3, 4)}


class FakeStream:
    _ids = itertools.count()

    def __init__(self, device: Any = None, priority: int = 0):
        self.id, self.device, self.waited_on = next(self._ids), device, []

    def wait_stream(self, other: "FakeStream") -> None:
        self.waited_on.append(other)

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"FakeStream({self.id})"


@dataclass
class Pool:
    id: tuple[int, int]
    use_count: int = 0


@dataclass
class Capture:
    """One finished capture: the graph (weakly: the fake must not keep it alive), its pool and stream,
    its op count and the data pointers of every tensor it reads or writes."""

    graph: Any  # weakref.ref to the FakeGraph
    pool: tuple[int, int]
    stream: FakeStream
    ops: int = 0
    touched: set[int] = field(default_factory=set)


class _Recorder(TorchDispatchMode):
    """Records every op of a capture and undoes its writes to tensors that existed before."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any, list[bool]]] = []
        self.made: set[int] = set()  # storages allocated inside the capture
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.touched: set[int] = set()  # data pointers of every tensor an op read or wrote

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _HOST_READS:
            raise RuntimeError(CAPTURE_SYNC)
        for t in self._written(func, name, args, kwargs):
            if t.untyped_storage().data_ptr() not in self.made:
                self.saved.append((t, t.detach().clone()))
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.touched |= {t.data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        # An output in storage of its own is static memory the replay must refill; one in an input's
        # storage (a view, or an in-place op's result) follows that input by itself. (``to``, ``contiguous``
        # or ``reshape`` may be either: what happened at capture decides, as the addresses do in a graph.)
        fresh = [isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs for t in tree_flatten(out)[0]]
        self.made |= {t.untyped_storage().data_ptr() for t, f in zip(tree_flatten(out)[0], fresh) if f}
        self.ops.append((func, args, kwargs, out, fresh))
        return out

    @staticmethod
    def _written(func, name, args, kwargs) -> list[torch.Tensor]:
        schema, out = func._schema.arguments, []
        marked = [i for i, a in enumerate(schema) if a.alias_info is not None and a.alias_info.is_write]
        training = name in _UNMARKED_WRITES and bool(args[5] if len(args) > 5 else kwargs.get("training", False))
        for i in marked + (list(_UNMARKED_WRITES[name]) if training else []):
            value = args[i] if i < len(args) else kwargs.get(schema[i].name)
            out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        return out

    def undo(self) -> None:
        with torch.no_grad():
            for t, before in reversed(self.saved):
                t.copy_(before)


class FakeGraph:
    """``torch.cuda.CUDAGraph`` on the CPU (see the module docstring)."""

    def __init__(self, cuda: "FakeCuda", keep_graph: bool = False):
        self.cuda, self.ops, self.pool_id, self.recorder, self.captured = cuda, [], None, None, False
        self.touched: set[int] = set()

    def capture_begin(self, pool=None, capture_error_mode: str = "global", **_) -> None:
        self.pool_id = self.cuda._incref(pool)
        self.recorder, self._rng = _Recorder(), torch.get_rng_state()
        self.recorder.__enter__()
        self.cuda.capturing = True

    def capture_end(self, failed: bool = False) -> None:
        self.cuda.capturing = False
        self.recorder.__exit__(None, None, None)
        self.recorder.undo()
        torch.set_rng_state(self._rng)
        if failed:
            self.recorder = None
            return
        self.ops, self.touched, self.captured = self.recorder.ops, self.recorder.touched, True
        self.recorder = None
        self.cuda.captures.append(Capture(weakref.ref(self), self.pool_id, self.cuda.current, len(self.ops), self.touched))

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("CUDAGraph::replay called on a graph that was never captured")
        self.cuda.replays += 1
        self._run()

    def _run(self) -> None:
        with torch.inference_mode():
            for func, args, kwargs, out, fresh in self.ops:
                new = func(*args, **kwargs)
                for o, n, f in zip(tree_flatten(out)[0], tree_flatten(new)[0], fresh):
                    if f:  # the captured output's memory gets this replay's values
                        o.copy_(n)

    def pool(self) -> tuple[int, int] | None:
        return self.pool_id

    def reset(self) -> None:
        if self.pool_id is not None:
            self.cuda._decref(self.pool_id)
            self.pool_id, self.ops, self.captured = None, [], False

    def __del__(self) -> None:
        try:
            self.reset()
        except Exception:  # interpreter shutdown
            pass


class FakeEvent:
    def __init__(self, enable_timing: bool = False, **_):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "FakeEvent") -> float:
        return (end.t - self.t) * 1e3


@dataclass
class FakeCuda:
    """The fake's state; ``install`` returns it."""

    fail_capture: str | None = None  # raise this from the captured block's end, as a capture that went wrong
    default: FakeStream = field(default_factory=FakeStream)
    current: FakeStream | None = None
    entered: list[FakeStream] = field(default_factory=list)
    pools: dict[tuple[int, int], Pool] = field(default_factory=dict)
    captures: list[Capture] = field(default_factory=list)
    replays: int = 0
    syncs: int = 0
    capturing: bool = False
    _pool_ids: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self):
        self.current = self.default

    # --- pools
    def graph_pool_handle(self) -> tuple[int, int]:
        return (0, next(self._pool_ids))

    def _incref(self, pool) -> tuple[int, int]:
        pid = pool if pool is not None else (1, next(self._pool_ids))
        if pid in self.pools:
            if self.pools[pid].use_count <= 0:
                raise RuntimeError(USE_COUNT_ASSERT)
            self.pools[pid].use_count += 1
        else:
            self.pools[pid] = Pool(pid, 1)
        return pid

    def _decref(self, pid) -> None:
        self.pools[pid].use_count -= 1  # the entry stays: memory allocated inside the capture survives

    # --- streams
    def current_stream(self, device=None) -> FakeStream:
        return self.current

    def stream(self, s: FakeStream) -> "_StreamContext":
        return _StreamContext(self, s)

    def synchronize(self, device=None) -> None:
        self.syncs += 1

    # --- capture
    def graph(self, cuda_graph: FakeGraph, pool=None, stream: FakeStream | None = None,
              capture_error_mode: str = "global") -> "_GraphContext":
        return _GraphContext(self, cuda_graph, pool, stream)

    def is_current_stream_capturing(self) -> bool:
        return self.capturing

    def live_tensors_read(self, tensors) -> bool:
        """Whether the last capture reads or writes every tensor in ``tensors`` (by data pointer)."""
        touched = self.captures[-1].touched
        return all(t.data_ptr() in touched for t in tensors)


class _StreamContext:
    """``torch.cuda.stream(s)``: ``s`` is current inside, the previous stream after. (Plain classes, no
    closures: a graph must die when its last reference goes, as a real one does.)"""

    def __init__(self, cuda: FakeCuda, s: FakeStream):
        self.cuda, self.s = cuda, s

    def __enter__(self) -> None:
        self.prev, self.cuda.current = self.cuda.current, self.s
        self.cuda.entered.append(self.s)

    def __exit__(self, *exc) -> None:
        self.cuda.current = self.prev


class _GraphContext:
    """``torch.cuda.graph(g, pool, stream)``."""

    def __init__(self, cuda: FakeCuda, graph: FakeGraph, pool, stream: FakeStream | None):
        self.cuda, self.graph, self.pool, self.stream = cuda, graph, pool, stream if stream is not None else FakeStream()

    def __enter__(self) -> None:
        self.cuda.synchronize()
        if self.stream is self.cuda.default:
            raise RuntimeError("CUDA graphs must be captured on a non-default stream. (However, after capture, "
                               "it's ok to replay them on the default stream.)")
        self.ctx = self.cuda.stream(self.stream)
        self.ctx.__enter__()
        self.graph.capture_begin(self.pool)

    def __exit__(self, kind, exc, tb) -> None:
        failed = kind is not None or self.cuda.fail_capture is not None
        self.graph.capture_end(failed)
        self.ctx.__exit__(kind, exc, tb)
        self.graph = None
        if kind is None and self.cuda.fail_capture is not None:
            raise RuntimeError(self.cuda.fail_capture)


def install(monkeypatch, fail_capture: str | None = None) -> FakeCuda:
    """Patch ``torch.cuda``'s graph API with the fake and let the training step capture on the CPU."""
    import compressor.distill.step as step

    cuda = FakeCuda(fail_capture=fail_capture)
    monkeypatch.setattr(step, "GRAPH_DEVICE_TYPES", ("cuda", "cpu"))
    patches = {
        "CUDAGraph": lambda keep_graph=False: FakeGraph(cuda, keep_graph), "graph": cuda.graph,
        "graph_pool_handle": cuda.graph_pool_handle, "Stream": lambda device=None, priority=0: FakeStream(device, priority),
        "current_stream": cuda.current_stream, "stream": cuda.stream, "synchronize": cuda.synchronize,
        "Event": FakeEvent, "empty_cache": lambda: None, "is_current_stream_capturing": cuda.is_current_stream_capturing,
    }
    for name, value in patches.items():
        monkeypatch.setattr(torch.cuda, name, value)
    return cuda
