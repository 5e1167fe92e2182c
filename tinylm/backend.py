"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every layer in tinylm is written once against an array module called ``xp``
(Chainer's ``get_array_module`` idiom): the module that owns the layer's inputs
and parameters. NumPy and CuPy share almost all of their API, so the same line
``y = x @ w + b`` runs on either. This file holds the few places where they
differ, and it is the only file that imports ``cupy``.

    get_xp("cpu") -> numpy          xp_of(array) -> numpy or cupy
    get_xp("cuda") -> cupy          to_numpy(array) -> numpy.ndarray

Testing without a GPU: ``use_cupy(module)`` installs a stand-in for the
``cupy`` module (tests/fakecupy.py is one) so that the ``device="cuda"`` code
path runs everywhere, with an array type that, like CuPy's, refuses to be
silently converted to NumPy.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np

DEVICES = ("cpu", "cuda", "auto")

_GPU_HINT = (
    'install the GPU extra with `pip install -e ".[gpu]"` (CuPy for CUDA 12) '
    "on a machine with an NVIDIA GPU, or use device='cpu'"
)

# The cupy module once imported (or a test stand-in), None when unavailable.
# `_cupy_state` is "unknown" until the first import attempt.
_cupy = None
_cupy_state = "unknown"
_cupy_error = ""


def _load_cupy():
    """Import CuPy once and check that a GPU is usable; None when not."""
    global _cupy, _cupy_state, _cupy_error
    if _cupy_state == "unknown":
        try:
            import cupy  # the one import of cupy in tinylm

            cupy.cuda.runtime.getDeviceCount()  # raises when no driver or GPU
            _cupy, _cupy_state = cupy, "ok"
        except Exception as exc:  # ImportError, CUDARuntimeError, ...
            _cupy, _cupy_state, _cupy_error = None, "missing", f"{type(exc).__name__}: {exc}"
    return _cupy


@contextlib.contextmanager
def use_cupy(module: types.ModuleType | None):
    """Temporarily use `module` as the CuPy backend (a test double, or None for 'no GPU')."""
    global _cupy, _cupy_state
    saved = (_cupy, _cupy_state)
    _cupy, _cupy_state = module, ("ok" if module is not None else "missing")
    try:
        yield module
    finally:
        _cupy, _cupy_state = saved


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    return _load_cupy() is not None


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" or "cpu"; validate the name."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


def get_xp(device: str = "cpu"):
    """The array module for a device name: numpy for "cpu", cupy for "cuda"."""
    device = resolve_device(device)
    if device == "cpu":
        return np
    cp = _load_cupy()
    if cp is None:
        reason = f" ({_cupy_error})" if _cupy_error else ""
        raise RuntimeError(f"device='cuda' needs CuPy and a CUDA GPU{reason}: {_GPU_HINT}")
    return cp


def _maybe_cupy_array(array) -> bool:
    """A CuPy array made before tinylm loaded CuPy: load it now so it is recognised."""
    if _cupy_state == "unknown" and type(array).__module__.startswith("cupy"):
        _load_cupy()
    return _cupy is not None and isinstance(array, _cupy.ndarray)


def xp_of(array):
    """The array module that owns `array` (cupy for GPU arrays, else numpy)."""
    if _maybe_cupy_array(array):
        return _cupy
    return np


def device_of(array) -> str:
    """ "cuda" for a GPU array, "cpu" otherwise."""
    return "cpu" if xp_of(array) is np else "cuda"


def to_numpy(array) -> np.ndarray:
    """A NumPy array with the same values (copied off the GPU when needed)."""
    if _maybe_cupy_array(array):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def to_device(array, xp):
    """Move a NumPy array onto the device of array module `xp` (no copy on the CPU)."""
    return array if xp is np else xp.asarray(array)


# ---------------------------------------------------------------------------
# Where NumPy and CuPy differ
# ---------------------------------------------------------------------------


def scatter_add_rows(target, ids, values):
    """target[ids[n]] += values[n] for every n, summing repeated ids.

    target (N, C), ids (M,) ints, values (M, C). This is the embedding
    gradient: a token that appears twice must receive both rows' gradients.
    Plain fancy-index assignment (`target[ids] += values`) would keep only
    one of them (subtle: NumPy buffers the write), which is why it is not used.
    """
    xp = xp_of(target)
    if xp is np:
        # np.add.at is correct but slow; sorting the ids and summing each run
        # of equal ids with reduceat gives the same sums (in a fixed order).
        order = np.argsort(ids, kind="stable")  # (M,)
        sorted_ids = ids[order]  # (M,)
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # (U,)
        sums = np.add.reduceat(values[order], starts, axis=0)  # (U, C)
        target[sorted_ids[starts]] += sums  # unique ids: no collisions
    else:
        xp.add.at(target, ids, values)  # CuPy >= 12.1: atomic adds on the GPU
    return target


def host_rng(seed) -> np.random.Generator:
    """A NumPy generator: random numbers are drawn on the host and then moved to
    the device, so a seed gives the same weights and dropout masks on CPU and GPU."""
    return np.random.default_rng(seed)


def rand(rng: np.random.Generator, shape, xp, dtype=np.float32):
    """uniform[0, 1) of `shape` drawn from `rng` on the host, then moved."""
    return to_device(rng.random(shape, dtype=np.float32).astype(dtype, copy=False), xp)


def resolve_dtype(dtype):
    """Accept "float32"/"float64" (or NumPy dtypes); anything else is an error."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from exc
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt
