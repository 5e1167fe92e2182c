"""Cutting the global batch into rank slices, and the weight of each slice.

Every rank draws the *whole* global batch (B, T) from the same seeded generator,
exactly as a one-process run draws it, and keeps only its rows. Drawing B windows
is cheap next to a forward pass, and it makes the data stream the same for any
number of ranks N, so the training trajectory does not depend on N.

Rows are dealt as np.array_split deals them: the first B % N ranks get one more.

The rule for the gradients. The loss is a mean over the counted tokens (targets
that are not ignore_index). Rank r sees n_r of the n tokens of the global batch
and computes the mean over its own, L_r. The global mean is the token-weighted
average of the rank means:

    L = sum_r (n_r / n) L_r

The all-reduce averages the ranks' gradients (sum, then / N), so rank r scales
its loss gradient by

    weight_r = N * n_r / n        (exactly 1.0 when every rank has as many tokens)

and sum_r weight_r * grad L_r / N = sum_r (n_r / n) grad L_r = grad L. Every rank
holds the global targets, so it counts n_r and n without communicating.
"""

from __future__ import annotations

import numpy as np


def row_ranges(batch_size: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) rows of each rank: sizes differ by at most one, larger first."""
    if size < 1:
        raise ValueError(f"the world size must be >= 1, got {size}")
    if batch_size < size:
        raise ValueError(f"batch_size {batch_size} is smaller than the world size {size}: "
                         "every rank needs at least one row")
    base, extra = divmod(batch_size, size)
    bounds = np.cumsum([0] + [base + (r < extra) for r in range(size)])
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(size)]


def shard_batch(x, y, rank: int, size: int, ignore_index: int = -100):
    """Rank `rank`'s rows of the global batch and its loss-gradient weight.

    x, y (B, T) -> x_r, y_r (B_r, T) views, and weight_r = N * n_r / n (see above).
    """
    start, stop = row_ranges(len(x), size)[rank]
    n_total = int(np.count_nonzero(y != ignore_index))
    n_mine = int(np.count_nonzero(y[start:stop] != ignore_index))
    weight = size * n_mine / n_total if n_total else 0.0
    return x[start:stop], y[start:stop], weight
