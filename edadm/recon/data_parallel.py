"""Data-parallel reconstruction: how the work of a unit is split over the ranks of a torchrun.

Under ``torchrun`` (``edadm.distributed.launch``) every rank holds the whole quantized model and
the whole cache of the unit in progress. The work is split so that the result is one process's,
up to the order of floating-point sums:
1. quantized caching passes (one per unit, through every unit before it: the largest part of
   the caching): rank r runs the calibration samples ``sample_shard`` (whole batches of
   ``recon.cache_batch_size``: every sample shares its batch with the same samples as in one
   process), then the captured unit inputs are gathered on every rank (``caching``);
2. learning: the batch of ``recon.batch_size`` indices drawn from the step's generator is the
   same on every rank; rank r takes the contiguous part ``batch_shard`` of it, weighs its loss
   by its share of the batch, and the gradients are summed over the ranks before every Adam
   step (``sum_gradients``): the full-batch gradient for any split, uneven ones too. QDrop
   draws its masks for the whole batch and keeps this rank's rows (``QDrop``);
3. losses before / after: rank r evaluates its share of the evaluation batches; the per-batch
   sums are exchanged and added in batch order as one process adds them (``sum_in_order``):
   the report's losses are the one process's for the same state.

Not split:
- the activation range initialisation: each batch's range search needs all of the batch's
  activations (a top-k and a seeded sample of them) and the EMA and the calibrating
  quantizers' outputs chain the batches, so rank 0 runs it and broadcasts the ranges;
- the float caching passes: one pass serves a group of units (up to ``recon.cache_mb``), and
  gathering what it captures (every layer output of the group) would move more bytes than the
  pass costs; every rank runs them whole (``caching.FloatCaches``);
- the quantized model's weight ranges (searched on every rank: same inputs, same code).

Why every rank keeps the whole cache rather than its shard: a batch's indices are spread over
the whole calibration set, so with sharded caches a rank's part of a batch would be the indices
it holds, a random count per batch (binomial), and the slowest rank would set the pace (at 8
ranks and batch 32, about twice the mean). Host memory per rank is therefore one process's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edadm.distributed import Dist, all_reduce_sum


def split(n_items: int, parts: int, index: int) -> slice:
    """Part ``index`` of ``n_items`` cut into ``parts`` contiguous runs whose sizes differ by one at most."""
    return slice(index * n_items // parts, (index + 1) * n_items // parts)


def sample_shard(dist: Dist, n_samples: int, chunk: int, rank: int | None = None) -> slice:
    """The calibration samples rank ``rank`` (default: this one) runs in the caching passes.

    Whole ``chunk``-sized batches when there are at least as many batches as ranks (each sample
    then shares its batch with the same samples as in one process); else one balanced run of
    samples each. Every rank gets at least one sample when ``n_samples`` >= world size.
    """
    rank = dist.rank if rank is None else rank
    batches = -(-n_samples // chunk)
    if batches < dist.world_size:
        return split(n_samples, dist.world_size, rank)
    part = split(batches, dist.world_size, rank)
    return slice(part.start * chunk, min(n_samples, part.stop * chunk))


def shard_sizes(dist: Dist, n_samples: int, chunk: int) -> list[int]:
    """The number of samples of every rank's ``sample_shard``, in rank order."""
    return [len(range(n_samples)[sample_shard(dist, n_samples, chunk, r)]) for r in range(dist.world_size)]


def batch_shard(dist: Dist, batch: int) -> slice:
    """This rank's contiguous part of a learning batch of ``batch`` samples (all of it for one process)."""
    return split(batch, dist.world_size, dist.rank)


def check_world(dist: Dist, n_samples: int, batch_size: int) -> None:
    """ValueError unless every rank gets a sample of every learning batch and of the caching passes."""
    batch = min(batch_size, n_samples)
    if dist.active and batch < dist.world_size:
        raise ValueError(
            f"data-parallel reconstruction on {dist.world_size} ranks needs learning batches of at least "
            f"{dist.world_size} samples, got {batch} (recon.batch_size={batch_size}, {n_samples} "
            "calibration samples): raise recon.batch_size or lower dist.nproc_per_node"
        )


def sum_gradients(dist: Dist, params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the ranks, in one collective (a missing one counts as 0).

    Each rank's loss is weighted by its share of the batch, so the sum is the full-batch gradient.
    """
    if not dist.active or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(dist, [flat])
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()


def sum_in_order(dist: Dist, rows: list[list[float]], device: torch.device) -> list[list[float]]:
    """Per-batch values that every rank filled for its own batches (zeros elsewhere), on every rank.

    x + 0 is exact, so the result holds each batch's values bitwise as the rank that computed them.
    """
    if not dist.active or not rows:
        return rows
    values = torch.tensor(rows, dtype=torch.float64, device=device)
    all_reduce_sum(dist, [values])
    return values.cpu().tolist()
