"""Which part of the data a rank takes: a contiguous slice of every global batch.

Rank r of N takes items ``[r*n/N, (r+1)*n/N)`` of a batch of n, so N ranks with micro-batch
n/N each train exactly as one process whose micro-batch is the whole n (gradients are
averaged across ranks; each rank's loss is the mean over its own items, so the average is
the global mean when the slices are equal: ``even=True`` insists on that). A loss averaged over
tokens (Hugging Face causal LM: labels other than -100) is the global mean only when every
rank's slice has as many counted tokens - with padding or masked labels it is the mean of the
ranks' means, as in DDP.
"""
from __future__ import annotations

from ..errors import DistributedError
from .process_group import DistributedSpec


def shard_indices(n: int, spec: DistributedSpec, *, even: bool = True) -> range:
    """The indices of ``range(n)`` this rank takes. ``even``: ``n`` must divide by the world size
    (equal slices: the averaged gradient is the global mean); otherwise the first ``n % N`` ranks
    take one item more."""
    world, rank = spec.world_size, spec.rank
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if even and n % world:
        raise DistributedError(f"a batch of {n} items does not split evenly over {world} ranks; use a global batch "
                               f"that is a multiple of {world} (unequal slices would weigh items unequally in the "
                               "averaged gradient), or even=False")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
