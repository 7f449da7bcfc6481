"""Distributed helpers for training and inference: one process per device, started by ``torchrun``.

``torchrun --nproc_per_node=N script.py ...`` starts N copies of a script and gives each the environment variables
``RANK`` (global process index), ``WORLD_SIZE`` (number of processes), ``LOCAL_RANK`` (index on this machine) and
``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_distributed` reads them (the torchvision references' convention).
Without them (a plain ``python script.py``) everything here is a no-op and the process is rank 0 of 1.

Backends: NCCL for CUDA devices, gloo for the CPU (PyTorch's recommendations, ``torch.distributed`` docs) and for
CUDA where NCCL is not built (Windows).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: How long a collective may wait for the slowest process. Long, because rank 0 may spend minutes on a step the
#: others wait for (e.g. merging the stage-2 ROI crop cache); PyTorch's default is 10 min (NCCL) / 30 min (gloo).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: global process index (0 = the main process, the only one that logs and saves).
        world_size: number of processes.
        local_rank: process index on this machine (selects ``cuda:<local_rank>``).
        enabled: True when a process group was initialised (``world_size > 1``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0


def env_context() -> DistContext:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment (no process group is created).

    Raises:
        ValueError: a variable is set but is not an integer, or the values are inconsistent.
    """
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun): {error}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent distributed environment: RANK={rank}, WORLD_SIZE={world_size}")
    return DistContext(rank, world_size, local_rank, enabled=False)


def init_distributed(device_type: str, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                     backend: str | None = None) -> DistContext:
    """Initialise the default process group when started by torchrun with more than one process.

    Args:
        device_type: ``"cuda"`` (NCCL, or gloo without NCCL; the process's GPU is ``cuda:<LOCAL_RANK>``, made current
            here) or ``"cpu"`` (gloo).
        timeout: collective timeout.
        backend: force a process-group backend; ``"gloo"`` for runs that exchange only Python objects (inference
            merging its tables), whatever the device.

    Returns:
        The :class:`DistContext` (``enabled`` False for a single process).

    Raises:
        RuntimeError: CUDA asked for but ``LOCAL_RANK`` names a GPU that does not exist.
    """
    ctx = env_context()
    if ctx.world_size == 1:
        return ctx
    if device_type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={ctx.local_rank} but only {torch.cuda.device_count()} CUDA GPU(s) are "
                               "visible; start at most that many processes per machine (--nproc_per_node)")
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        # NCCL for GPUs where it exists (Linux); gloo otherwise (CPU, and CUDA on Windows, which has no NCCL)
        backend = backend or ("nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=timeout, rank=ctx.rank, world_size=ctx.world_size)
    return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, enabled=True)


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group created by :func:`init_distributed` (no-op for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0, or when no process group is initialised."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(ctx: DistContext) -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place, and return it (unchanged for a single process).

    With NCCL the tensor must live on this process's GPU; gloo takes CPU tensors.
    """
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True when ``flag`` is True on every process (so that all ranks take the same branch)."""
    if not ctx.enabled:
        return bool(flag)
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return int(value.item()) == 0


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every process, in place.

    Under DistributedDataParallel the weights are identical on every rank but each rank's BatchNorm statistics
    are updated by its own last batch; call this before evaluating so that every rank evaluates the model that
    rank 0 saves.
    """
    if ctx.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src)


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Send a picklable object from rank ``src`` to all processes and return it (the object itself when single)."""
    if not ctx.enabled:
        return obj
    holder = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(holder, src)
    return holder[0]


def gather_objects(obj, ctx: DistContext, dst: int = 0) -> list | None:
    """Collect a picklable object from every process on rank ``dst``: the list of all of them (in rank order) there,
    None elsewhere; ``[obj]`` for a single process. Needs a gloo process group (objects travel through the CPU)."""
    if not ctx.enabled:
        return [obj]
    holder = [None] * ctx.world_size if ctx.rank == dst else None
    dist.gather_object(obj, holder, dst=dst)
    return holder
