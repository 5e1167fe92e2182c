"""One flat buffer for many arrays: the gradients travel in one collective, not one each.

A model has dozens of parameter arrays of many shapes. All-reducing each one would
pay the network's latency dozens of times per step; packing them end to end into
one contiguous vector pays it once (PyTorch's DDP does the same with "buckets"):

    arrays   a0 (3, 4)          a1 (4,)    a2 (2, 2, 2)
    flat     [ a0.ravel() (12) | a1 (4)  | a2.ravel() (8) | padding ]    (24 + pad,)
    offsets    0..12             12..16    16..24

pack() copies every array into its slot, unpack() copies each slot back into its
own array, in place (`a[...] = ...`), so the arrays keep their identity: the
optimizer's references and any views of them stay valid, and the dtype is kept.
The padding (zeros) rounds the length up to a multiple of the world size, so ZeRO
can cut the vector into equal shards.
"""

from __future__ import annotations

from tinylm.backend import xp_of


class FlatBuffer:
    """A flat (n,) array with one slot per array of `arrays` (all of one dtype and xp)."""

    def __init__(self, arrays, multiple_of: int = 1):
        self.arrays = list(arrays)
        if not self.arrays:
            raise ValueError("FlatBuffer got no arrays")
        first = self.arrays[0]
        self.xp, self.dtype = xp_of(first), first.dtype
        for a in self.arrays:
            if a.dtype != self.dtype or xp_of(a) is not self.xp:
                raise ValueError(f"a FlatBuffer holds one dtype on one device: got {a.dtype} "
                                 f"beside {self.dtype} (use buckets_by_dtype)")
        self.offsets = []  # (start, stop) of each array's slot
        start = 0
        for a in self.arrays:
            self.offsets.append((start, start + a.size))
            start += a.size
        self.numel = start  # elements that belong to an array
        padded = -(-start // multiple_of) * multiple_of  # rounded up
        self.flat = self.xp.zeros(padded, dtype=self.dtype)  # (padded,)

    def pack(self):
        """Copy every array into its slot; returns the flat array."""
        for a, (start, stop) in zip(self.arrays, self.offsets, strict=True):
            self.flat[start:stop] = a.reshape(-1)
        return self.flat

    def unpack(self) -> None:
        """Copy every slot back into its own array (in place: identity and dtype kept)."""
        for a, (start, stop) in zip(self.arrays, self.offsets, strict=True):
            a[...] = self.flat[start:stop].reshape(a.shape)


def buckets_by_dtype(arrays, multiple_of: int = 1) -> list[FlatBuffer]:
    """One FlatBuffer per dtype, in order of first appearance (a model in one dtype
    gets exactly one)."""
    groups: dict = {}
    for a in arrays:
        groups.setdefault((a.dtype, id(xp_of(a))), []).append(a)
    return [FlatBuffer(group, multiple_of) for group in groups.values()]


class GradientAllReduce:
    """Average the gradients of `params` ((name, p, g) triples) over the ranks:
    pack into a flat buffer, one allreduce_sum, divide by the world size, unpack.

    Call it once per optimizer step, after all the micro-batches of gradient
    accumulation: the gradients add up locally (+=), so one collective carries them all.
    """

    def __init__(self, params, comm):
        self.comm = comm
        self.buckets = buckets_by_dtype([g for _, _, g in params])

    def __call__(self) -> None:
        for bucket in self.buckets:
            flat = bucket.pack()
            self.comm.allreduce_sum(flat)
            flat /= self.comm.size  # a sum of rank means -> the mean (see batch.py)
            bucket.unpack()
