"""Scale-out with PyTorch's own engine: a stage under ``torchrun`` (torch.distributed).

A stage script calls ``launch(params)`` first. With ``dist.nproc_per_node`` above 1 and the
script not yet under torchrun, it re-runs itself as ``torchrun --standalone --nproc-per-node
N`` (same arguments) and exits with its status: the DVC command stays ``python stages/X.py``,
so changing ``dist`` reruns nothing (results do not depend on the process count). Under
torchrun (launched so, or by hand on each node of a multi-node run) it joins the process
group: NCCL where the rank has a GPU (``cuda:LOCAL_RANK``), gloo on CPU, with a timeout so
that no rank waits forever for one that died.

``Dist`` is what the library sees: rank, world size, the rank's device, chunk-aligned shards
of the items, barriers, the gather of a sharded pass's results on rank 0, and the all-reduce of
data-parallel reconstruction. A plain ``python stages/X.py`` gets ``Dist()`` (one process) and
runs exactly as without it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from edadm.config import check_range, load_section

logger = logging.getLogger(__name__)

SECTION = "dist"
UNDER_TORCHRUN = "TORCHELASTIC_RUN_ID"  # set by torchrun in every rank's environment


@dataclass(frozen=True)
class DistConfig:
    """params.yaml ``dist``: how many processes a stage runs on (never part of a stage's params)."""

    nproc_per_node: int = 1  # >1: the heavy stages relaunch under torchrun with this many ranks
    timeout_s: int = 1800  # a collective waiting longer (a rank died) fails the stage

    def __post_init__(self) -> None:
        check_range(f"{SECTION}.nproc_per_node", self.nproc_per_node, 1)
        check_range(f"{SECTION}.timeout_s", self.timeout_s, 1)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank ``rank`` of ``world_size`` (1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that creates and finishes stores and writes single-file artifacts."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n_items: int, chunk: int = 1) -> range:
        """This rank's items of ``n_items``: a contiguous run of whole ``chunk``-sized blocks, so
        that ranks never write the same Zarr chunk. The blocks are split as evenly as they go
        (rank counts differ by at most one block), so no rank idles at the final barrier for
        longer than one block takes; ranks beyond the number of blocks get none."""
        blocks = -(-n_items // chunk)
        first = self.rank * blocks // self.world_size
        last = (self.rank + 1) * blocks // self.world_size
        return range(min(n_items, first * chunk), min(n_items, last * chunk))

    def barrier(self) -> None:
        if self.active:
            with _naming_the_timeout(self, "barrier"):
                torch_dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value]
        with _naming_the_timeout(self, "broadcast"):
            torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (any picklable object) on rank 0, in rank order; None elsewhere."""
        if not self.active:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        with _naming_the_timeout(self, "gather"):
            torch_dist.gather_object(value, gathered, dst=0)
        return gathered


def launch(params: Mapping[str, Any], device: torch.device | None = None) -> Dist:
    """Relaunch under torchrun when ``dist.nproc_per_node`` > 1, else join torchrun's group if this
    process is one of its ranks; return this process's ``Dist``.

    ``device``: the stage's device (``device.name``); a rank with GPUs uses ``cuda:LOCAL_RANK``.
    """
    config = load_section(DistConfig, SECTION, params)
    if UNDER_TORCHRUN not in os.environ:
        if config.nproc_per_node > 1:
            sys.exit(_relaunch(config.nproc_per_node))
        return Dist()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size > 1 and not torch_dist.is_initialized():
        on_gpu = torch.cuda.is_available() and (device is None or device.type == "cuda")
        if on_gpu:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(
            backend="nccl" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=config.timeout_s)
        )
    if world_size > 1:
        logger.info("rank %d of %d (local rank %d)", rank, world_size, local_rank)
    return Dist(rank, world_size, local_rank)


def rank_device(device: torch.device, dist: Dist) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when the stage runs on CUDA, else ``device``."""
    if device.type == "cuda" and dist.active:
        return torch.device("cuda", dist.local_rank)
    return device


def _relaunch(nproc: int) -> int:
    """Run this script again under torchrun with ``nproc`` ranks on this node; its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += [sys.argv[0], *sys.argv[1:]]
    logger.info("dist.nproc_per_node=%d: %s", nproc, " ".join(command))
    # torchrun gives each rank one thread when OMP_NUM_THREADS is unset: share the cores instead
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = subprocess.Popen(command, env=env)
    # A SIGTERM (a job scheduler, `kill`) reaches only this process: pass it to torchrun, which
    # stops its ranks, and wait for it, so that the stage ends with no rank left running. Ctrl-C
    # reaches torchrun itself (the same process group); this process only waits for it to end,
    # as a second SIGINT would interrupt torchrun's own shutdown of the ranks.
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum)),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status:
        # torchrun has printed which rank failed and how; a store is only marked complete once
        # every rank has written its region, so rerunning the stage redoes the work.
        logger.error(
            "torchrun exited with status %d: a rank failed (see its error above); no output was "
            "completed, rerun the stage",
            status,
        )
    return status


@contextlib.contextmanager
def _naming_the_timeout(dist: Dist, collective: str) -> Iterator[None]:
    """Turn a collective's bare backend error (a rank died, hangs or is slower than the timeout)
    into one that says what to do."""
    try:
        yield
    except RuntimeError as err:  # gloo raises RuntimeError, NCCL DistBackendError (a subclass)
        raise RuntimeError(
            f"rank {dist.rank} of {dist.world_size}: {collective} failed ({err}). Another rank died "
            "(its error is in the log) or did not get there within dist.timeout_s; a rank that finished "
            "its share waits there for the others, so raise dist.timeout_s for stages longer than it"
        ) from err


def shutdown(dist: Dist) -> None:
    """Leave the process group (the end of a stage)."""
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(dist: Dist, tensors: Iterable[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over the ranks (weighted gradients, partial sums of data-parallel
    reconstruction); every rank gets the same result. With NCCL the tensors must be on the GPU."""
    if not dist.active:
        return
    with _naming_the_timeout(dist, "all_reduce"):
        for tensor in tensors:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def all_gather_rows(dist: Dist, tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (on ``tensor``'s device).

    ``rows[r]``: the rows rank r holds (they may differ; the other dims must not). With NCCL
    the tensor must be on the GPU.
    """
    if not dist.active:
        return tensor
    if len(rows) != dist.world_size or tensor.shape[0] != rows[dist.rank]:
        raise ValueError(
            f"rank {dist.rank} holds {tensor.shape[0]} rows; expected rows[{dist.rank}] of {rows}"
        )
    is_bool = tensor.dtype == torch.bool  # not every backend reduces or gathers bool
    part = tensor.to(torch.uint8) if is_bool else tensor
    padding = max(rows) - part.shape[0]  # all_gather needs equal shapes
    if padding:
        part = torch.cat([part, part.new_zeros((padding, *part.shape[1:]))])
    parts = [torch.empty_like(part) for _ in range(dist.world_size)]
    with _naming_the_timeout(dist, "all_gather"):
        torch_dist.all_gather(parts, part.contiguous())
    gathered = torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])
    return gathered.bool() if is_bool else gathered
