"""Data-parallel training across processes, the way ``torchrun`` starts them.

``torchrun --nproc-per-node N -m cli compress …`` (or ``atc compress --nproc N``, which runs the
same through ``torch.distributed.run``) starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment. ``init`` joins
them into one process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU). Only the
student is wrapped in ``DistributedDataParallel``: the teacher is frozen, so each rank runs its
forward on its own shard without any communication. Each rank reads its own share of every
epoch's batches and of the test set; evaluation sums are all-reduced; rank 0 alone writes
metrics, checkpoints and reports. ``train.batch_size`` is the global batch: each of N ranks
takes ``batch_size / N`` images per step, so the recipe (lr, steps per epoch) does not change
with the number of processes.

BatchNorm statistics are per rank during a step (as in DDP's default); its running averages
are taken from rank 0 at every step and, so that every rank ends with the same student, once
more at the end of each epoch.

On CUDA, rank r of a node uses ``cuda:LOCAL_RANK`` for everything: ``init`` calls
``torch.cuda.set_device`` before ``init_process_group`` and binds the group to that GPU
(``device_id``); the teacher, the student (DDP ``device_ids=[LOCAL_RANK]``), the batches and every
all-reduce live there, and NCCL barriers name it (``device_ids``), so no rank falls back to GPU 0.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from compressor.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True inside a process that ``torchrun`` started as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> RankInfo:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if not active():
        return RankInfo()
    return RankInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def is_main() -> bool:
    return current().is_main


def init(device: str = "auto", timeout_s: float = 1800.0) -> tuple[RankInfo, str]:
    """Join the process group described by torchrun's environment; return this rank and its device.

    Without torchrun's variables nothing happens and ``device`` comes back unchanged. With CUDA
    (``device`` auto or cuda) each process takes the GPU of its ``LOCAL_RANK`` and NCCL; otherwise
    gloo on the CPU.
    """
    if not launched_by_torchrun():
        return RankInfo(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for but no CUDA device is available; use --device cpu or auto")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); start at most "
                              f"{torch.cuda.device_count()} processes per node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        # device_id binds this rank's GPU to the group (set_device above comes first): NCCL starts its
        # communicator on it, and collectives and barriers cannot fall back to GPU 0 on every rank.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device(device) if use_cuda else None)
    return current(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; on NCCL the barrier runs on this rank's own GPU (not GPU 0)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (unchanged without a process group)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def wrap_student(student: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around the student (the teacher is never wrapped)."""
    if not active():
        return student
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # buffers (BN statistics) are broadcast from rank 0 at every forward, DDP's default
    return nn.parallel.DistributedDataParallel(student, device_ids=ids, gradient_as_bucket_view=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank."""
    if not active():
        return
    for buf in unwrap(model).buffers():
        dist.broadcast(buf.data, src=0)


def check_same_weights(model: nn.Module, device: torch.device) -> None:
    """Raise ``TrainingError`` unless every rank holds the same parameters and buffers (a checksum)."""
    if not active():
        return
    m = unwrap(model)
    with torch.no_grad():
        sums = [t.detach().double().sum() for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
        squares = [t.detach().double().square().sum() for t in m.parameters()]
    mine = torch.stack([torch.stack(sums).sum(), torch.stack(squares).sum()]).to(device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if any(not torch.equal(every[0], other) for other in every[1:]):
        raise TrainingError("the data-parallel ranks ended with different student weights; report this as a bug, and train "
                            "with one process (no --nproc) meanwhile")


# ----------------------------------------------------------------------------------------------
# Launching: atc … --nproc N → python -m torch.distributed.run … -m cli …

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def strip_launch_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launcher's own options (``--nproc 2`` and ``--nproc=2`` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def launch_command(argv: Sequence[str], nproc: int, nnodes: str | None = None, node_rank: int | None = None,
                   master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """The ``torch.distributed.run`` command that starts ``nproc`` copies of ``atc argv`` on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes is not None:
        cmd += ["--nnodes", str(nnodes)]
    if node_rank is not None:
        cmd += ["--node-rank", str(node_rank)]
    if master_addr is not None:
        cmd += ["--master-addr", master_addr]
    if master_port is not None:
        cmd += ["--master-port", str(master_port)]
    if nnodes in (None, "1") and master_addr is None and master_port is None:
        cmd += ["--standalone"]  # one node: a free local port, no rendezvous server to set up
    return cmd + ["-m", "cli", *strip_launch_flags(argv)]


def relaunch(argv: Sequence[str], nproc: int, **multi_node) -> int:
    """Run ``atc argv`` as ``nproc`` processes per node with ``torch.distributed.run`` (in this process,
    as the ``torchrun`` command would); return the exit code of the first process that failed, or 0.
    The processes' own one-line errors are the message; torchrun's failure report is left out. The
    command as typed reaches the processes in ``ATC_COMMAND`` (reports record it)."""
    import logging
    import shlex

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("ATC_COMMAND", shlex.join(["atc", *argv]))
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    try:
        run(parse_args(launch_command(argv, nproc, **multi_node)[3:]))
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # a process killed by signal N: 128 + N, as a shell reports it
    finally:
        elastic.setLevel(level)
    return 0
