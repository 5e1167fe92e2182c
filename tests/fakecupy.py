"""fakecupy: a test double of the CuPy module, made of NumPy.

Why it exists
-------------
tinylm runs the same layer code on NumPy (CPU) and CuPy (NVIDIA GPU), but CI
has no GPU and CuPy is not installed there. Code that is only ever run on
NumPy hides the two classic CuPy bugs:

1. Silent host/device mixing. ``gpu_array + numpy_array`` works in NumPy-only
   code but raises ``TypeError: Unsupported type <class 'numpy.ndarray'>`` in
   CuPy: a NumPy array (host memory) was never moved to the GPU.
2. Implicit conversion. ``np.asarray(gpu_array)``, ``np.concatenate`` of a GPU
   array, plotting or saving one: CuPy refuses (``Implicit conversion to a
   NumPy array is not allowed``); the code must call ``.get()`` or
   ``cupy.asnumpy()`` explicitly.

``tinylm.backend.use_cupy(fakecupy)`` installs this module in place of
``cupy``, so the ``device="cuda"`` path runs everywhere with an array type
that fails in those two ways, like CuPy does.

What it does
------------
* ``fakecupy.ndarray`` wraps a NumPy array (``self._a``). It is *not* a
  ``numpy.ndarray`` subclass, refuses ``__array__``, and refuses to meet a
  ``numpy.ndarray`` in arithmetic, ufuncs, NumPy functions, indexing and
  assignment (in both operand orders). Python and NumPy *scalars* mix freely.
* Everything else is NumPy underneath: module functions (``fakecupy.exp``,
  ``fakecupy.einsum``, ``fakecupy.linalg.norm``...) come from ``numpy`` via
  PEP 562 ``__getattr__``, with device arrays unwrapped on the way in and
  results wrapped on the way out. Reductions give 0-d device arrays, as CuPy
  does, and ``float()`` / ``int()`` / ``bool()`` / ``.item()`` bring them back.
* Views alias (``x[:, :2] += 1`` changes ``x``), in-place operators keep the
  array's identity (optimizers hold references), ``out=`` writes in place.
* Explicit transfers: ``asarray`` / ``array`` copy host data in (always a
  copy, as a real upload is), ``asnumpy`` / ``.get()`` copy it back out.
* ``ufunc.at`` follows CuPy's limits: only add, subtract, maximum, minimum and
  the bitwise and/or/xor have it, each for a few dtypes (``add.at`` takes
  int32, uint32, uint64, float16, float32 and float64, not int64). As in
  CuPy, NumPy's own ufunc methods refuse device arrays: ``np.add.at(x, ...)``
  raises, ``xp.add.at(x, ...)`` is the way.
* No ``__index__``, as in CuPy: ``range(n)`` with a 0-d device array raises;
  ``range(int(n))`` is the explicit (synchronising) way.
* ``empty`` / ``empty_like`` / ``ndarray(shape)`` fill float arrays with NaN:
  CuPy hands out recycled pool memory, so reading before writing is a bug that
  should be loud.
* A minimal ``fakecupy.cuda`` (one device, streams, events, timing) and a
  memory pool that tracks, roughly, the bytes of live device buffers.

What it does not model
----------------------
No real GPU memory (arrays live in host RAM; the pool's numbers are
bookkeeping), no asynchronous streams (everything runs eagerly, so
``synchronize()`` does nothing and a missing synchronize is not caught), no
kernel compilation (``ElementwiseKernel``, ``RawKernel``... are absent;
``fuse`` runs the function as is), no CUDA-specific numerics (atomic-add
ordering, TF32, cuBLAS rounding): results are bit-for-bit NumPy's.
``IS_TEST_DOUBLE`` is True so code and tests can tell.

Where it knowingly differs from CuPy
------------------------------------
Stricter, on purpose (tinylm moves data explicitly): a NumPy array used as an
index (``x[np_ids]``), assigned into a device array (``x[...] = np_array``)
or given to ``ufunc.outer`` raises here; CuPy uploads it silently.
Looser: every NumPy function, method and keyword exists here, while CuPy
lacks some; generic functions accept Python lists (CuPy takes them only in
array constructors); out-of-bounds integer-array indices raise IndexError
(CuPy wraps them around); ``x[ids] = v`` with repeated ids keeps the last
value (CuPy: undefined); ``reduce`` / ``accumulate`` work for every ufunc;
functions that return Python scalars in NumPy (``allclose``) do so here too.
Different: dtype promotion is the installed NumPy's; random streams are
NumPy's (a seed gives other numbers than on a GPU; ``randn`` takes no
``dtype=``); ``repr`` says ``device='fake-gpu'``; ``empty`` is NaN-filled.
"""

from __future__ import annotations

import functools
import operator
import sys
import time
import types
import weakref
from typing import ClassVar

import numpy as np

IS_TEST_DOUBLE = True
__version__ = "13.0.0"  # the CuPy API level this double imitates

_DEVICE_NAME = "fake-gpu"
_DEVICE_COUNT = 1
_DEVICE_MEMORY = 16 * 1024**3  # bytes the fake device pretends to have
_ALLOCATION_UNIT = 512  # CuPy's pool rounds every allocation up to 512 bytes

# Operands that may meet a device array: Python and NumPy scalars (as in CuPy).
_SCALAR_TYPES = (bool, int, float, complex, np.generic)

_IMPLICIT_CONVERSION_MESSAGE = (
    "Implicit conversion to a NumPy array is not allowed. "
    "Please use `.get()` to construct a NumPy array explicitly."
)


def _unsupported(obj) -> TypeError:
    """CuPy's error for a host array (or other foreign object) given to a device operation."""
    message = f"Unsupported type {type(obj)}"
    if isinstance(obj, np.ndarray):
        message += (
            " (fakecupy: a NumPy array met a device array; move it to the device with"
            " xp.asarray(...) first, or bring the device array back with .get())"
        )
    return TypeError(message)


# ---------------------------------------------------------------------------
# Crossing the wrapper boundary
# ---------------------------------------------------------------------------


def _unwrap(obj, sources: list):
    """Replace device arrays by their NumPy arrays, through lists, tuples and dicts.

    Raw NumPy arrays raise TypeError: host data must be moved explicitly.
    Every device array met is appended to `sources` (see `_wrap`).
    """
    if isinstance(obj, ndarray):
        sources.append(obj)
        return obj._a
    if isinstance(obj, np.ndarray):
        raise _unsupported(obj)
    if isinstance(obj, (list, tuple)):
        items = [_unwrap(item, sources) for item in obj]
        if type(obj) is list:
            return items
        if type(obj) is tuple:
            return tuple(items)
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {key: _unwrap(value, sources) for key, value in obj.items()}
    return obj


def _wrap(obj, sources=()):
    """Wrap NumPy results as device arrays (NumPy scalars become 0-d arrays, as in CuPy).

    A result that *is* the NumPy array of one of the `sources` (an `out=`
    argument, or a no-op like ``astype(same dtype, copy=False)``) comes back as
    that same device array, so identity is kept. A view of a source gets that
    source (or its base) as ``.base``.
    """
    if isinstance(obj, np.ndarray):
        for src in sources:
            if obj is src._a:
                return src
        return ndarray._from_numpy(obj, _view_base(obj, sources))
    if isinstance(obj, np.generic):
        return ndarray._from_numpy(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        items = [_wrap(item, sources) for item in obj]
        if type(obj) is list:
            return items
        if type(obj) is tuple:
            return tuple(items)
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, (np.random.Generator, np.random.RandomState)):
        return _DeviceObject(obj)
    return obj


def _view_base(array: np.ndarray, sources) -> ndarray | None:
    """The device array that `array` is a view of, if any (CuPy's ``.base`` rule)."""
    if array.base is None:
        return None
    for src in sources:
        if np.may_share_memory(array, src._a):
            return src._base if src._base is not None else src
    return None


def _device_function(func, bound_to: ndarray | None = None):
    """Wrap a NumPy callable: device arrays in -> NumPy arrays, NumPy results -> device arrays.

    `bound_to` is the device array a method (``x.reshape``) belongs to: its
    results may be views of it, or it itself.
    """

    def device_call(*args, **kwargs):
        sources = [] if bound_to is None else [bound_to]
        result = func(*_unwrap(args, sources), **_unwrap(kwargs, sources))
        return _wrap(result, sources)

    if bound_to is None:  # module functions keep NumPy's name and docstring
        device_call = functools.wraps(func)(device_call)
    return device_call


# ---------------------------------------------------------------------------
# Ufuncs: CuPy's operand rules and its limits on ufunc.at
# ---------------------------------------------------------------------------

_COMPARISONS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")

# ufunc name -> dtypes CuPy's `ufunc.at` supports (atomic operations on the GPU).
_AT_DTYPES = {
    "add": ("int32", "uint32", "uint64", "float16", "float32", "float64"),
    "subtract": ("int32", "uint32"),
    "maximum": ("int32", "uint32", "uint64", "float32", "float64"),
    "minimum": ("int32", "uint32", "uint64", "float32", "float64"),
    "bitwise_and": ("int32", "int64", "uint32", "uint64"),
    "bitwise_or": ("int32", "int64", "uint32", "uint64"),
    "bitwise_xor": ("int32", "int64", "uint32", "uint64"),
}


def _check_at(ufunc: np.ufunc, target) -> None:
    """Refuse what CuPy's ``ufunc.at`` refuses."""
    name = ufunc.__name__
    if name not in _AT_DTYPES:
        raise NotImplementedError(f"`{name}.at` is not supported yet")
    if not isinstance(target, ndarray):
        raise _unsupported(target)
    if target.dtype.name not in _AT_DTYPES[name]:
        raise TypeError(
            f"cupy.{name}.at only supports {', '.join(_AT_DTYPES[name])} as data type "
            f"(got {target.dtype})"
        )


def _apply_ufunc(ufunc: np.ufunc, method: str, args: tuple, kwargs: dict):
    """Run ``ufunc.method`` (``"__call__"``, ``"at"``, ``"reduce"``...) on device arrays."""
    if method == "__call__":
        for operand in args[: ufunc.nin]:  # CuPy takes device arrays and scalars only
            if not isinstance(operand, (ndarray, *_SCALAR_TYPES)):
                raise _unsupported(operand)
    elif method == "at":
        _check_at(ufunc, args[0] if args else None)
    sources = []
    raw_args, raw_kwargs = _unwrap(args, sources), _unwrap(kwargs, sources)
    return _wrap(getattr(ufunc, method)(*raw_args, **raw_kwargs), sources)


class _DeviceUfunc:
    """A NumPy ufunc seen from fakecupy: same call and methods, device arrays only."""

    def __init__(self, ufunc: np.ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__
        self.__doc__ = ufunc.__doc__

    def __call__(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "__call__", args, kwargs)

    def at(self, a, indices, b=None):
        args = (a, indices) if b is None else (a, indices, b)
        _apply_ufunc(self._ufunc, "at", args, {})

    def reduce(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "reduce", args, kwargs)

    def accumulate(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "accumulate", args, kwargs)

    def reduceat(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "reduceat", args, kwargs)

    def outer(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "outer", args, kwargs)

    def __getattr__(self, name):  # nin, nout, identity, types, signature...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._ufunc, name)

    def __repr__(self):
        return f"<ufunc {self.__name__!r} (fakecupy)>"


class _DeviceObject:
    """A host object whose methods make device arrays (np.random.Generator, RandomState)."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._obj, name)
        return _device_function(attr) if callable(attr) else attr

    def __repr__(self):
        return f"{self._obj!r} (fakecupy)"


def _device_attribute(obj):
    """What fakecupy (or one of its submodules) exposes for the NumPy object `obj`."""
    if isinstance(obj, np.ufunc):
        return _DeviceUfunc(obj)
    if isinstance(obj, type):
        if issubclass(obj, (np.random.Generator, np.random.RandomState)):
            return _device_function(obj)  # instances come back as _DeviceObject
        return obj  # dtypes and scalar types (float32, dtype, finfo...) pass through
    if callable(obj):
        return _device_function(obj)
    return obj  # pi, inf, newaxis, e...


# ---------------------------------------------------------------------------
# The device array
# ---------------------------------------------------------------------------


class ndarray:
    """A "device" array: a NumPy array behind a wall that NumPy arrays cannot cross.

    ``ndarray(shape, dtype=float)`` makes an uninitialised array (NaN-filled
    when floating, see the module docstring), like ``cupy.ndarray(shape)``.
    """

    __slots__ = ("__weakref__", "_a", "_base")
    __array_priority__ = 100.0  # CuPy's value
    __hash__ = None  # arrays are mutable and compare elementwise

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if isinstance(shape, (np.ndarray, ndarray)):
            raise TypeError(
                "ndarray(shape) takes a shape; use fakecupy.asarray(data) to copy data in"
            )
        if memptr is not None or strides is not None:
            raise NotImplementedError("fakecupy.ndarray has no device pointers (memptr, strides)")
        self._a = _poisoned_empty(shape, dtype, order)
        self._base = None
        _default_memory_pool._track(self._a)

    @classmethod
    def _from_numpy(cls, array: np.ndarray, base: ndarray | None = None) -> ndarray:
        obj = object.__new__(cls)
        obj._a = array
        obj._base = base
        _default_memory_pool._track(array)
        return obj

    # -- refusing implicit conversion, the core of the double -----------------

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT_CONVERSION_MESSAGE)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # np.exp(fake) and np_array + fake land here. Like CuPy, only plain calls
        # are taken: np.add.at(fake, ...) or np.add.reduce(fake) raise TypeError
        # (fakecupy.add.at is the way), and so does more than one `out`.
        if method != "__call__" or len(kwargs.get("out", ())) > 1:
            return NotImplemented
        if ufunc.__name__ in _COMPARISONS:
            # CuPy's workaround for numpy/numpy#12142: `np.float32(1) < x` reaches
            # us with the NumPy scalar turned into a 0-d NumPy array; take it back.
            inputs = tuple(
                x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x for x in inputs
            )
        return _apply_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, relevant_types, args, kwargs):
        # np.sum(fake), np.concatenate([fake, ...]) land here; NumPy arrays among
        # the arguments raise TypeError in _unwrap.
        sources = []
        result = func(*_unwrap(args, sources), **_unwrap(kwargs, sources))
        return _wrap(result, sources)

    # -- explicit transfers ---------------------------------------------------

    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        """A NumPy copy (device -> host); into `out` when given."""
        if out is None:
            return np.array(self._a, order=order, copy=True)
        if not isinstance(out, np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError("Shape or dtype mismatch between out and the device array")
        np.copyto(out, self._a)
        return out

    def set(self, arr, stream=None) -> None:
        """Copy the NumPy array `arr` into this array (host -> device), as CuPy's ``set``."""
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        np.copyto(self._a, arr)

    # -- scalars out of size-1 arrays (a synchronisation point in CuPy) ------
    # No __index__, as in CuPy: range(n) or a list index needs int(n) first.

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __bool__(self):
        return bool(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    # -- container protocol ---------------------------------------------------

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __getitem__(self, key):
        sources = [self]
        return _wrap(self._a[_index_key(key, sources)], sources)

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            raise _unsupported(value)
        self._a[_index_key(key, [])] = _unwrap(value, [])

    # -- attributes -----------------------------------------------------------

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    base = property(lambda self: self._base, doc="The array this one is a view of, or None.")
    T = property(lambda self: _wrap(self._a.T, [self]))
    real = property(lambda self: _wrap(self._a.real, [self]))
    imag = property(lambda self: _wrap(self._a.imag, [self]))
    device = property(lambda self: _Device(0))

    def __getattr__(self, name):
        # Methods (reshape, sum, astype, fill...) forward to NumPy. Dunder names
        # are refused: forwarding __array_interface__ would let NumPy convert us.
        if name.startswith("__") or name in ndarray.__slots__:
            raise AttributeError(name)
        try:
            attr = getattr(self._a, name)
        except AttributeError:
            raise AttributeError(f"'fakecupy.ndarray' object has no attribute {name!r}") from None
        if name in ("item", "tolist", "tobytes"):
            return attr  # Python objects / bytes: explicit host results
        return _device_function(attr, bound_to=self) if callable(attr) else _wrap(attr, [self])

    def __repr__(self):
        return f"{repr(self._a)[:-1]}, device={_DEVICE_NAME!r})"

    def __str__(self):
        return str(self._a)

    # -- copying and pickling (CuPy copies the data in all three) -------------

    def __copy__(self):
        return ndarray._from_numpy(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray._from_numpy(self._a.copy())

    def __reduce__(self):
        return (array, (self.get(),))

    # -- unary operators ------------------------------------------------------

    def __neg__(self):
        return _wrap(-self._a)

    def __pos__(self):
        return _wrap(+self._a)

    def __abs__(self):
        return _wrap(abs(self._a))

    def __invert__(self):
        return _wrap(~self._a)

    def __divmod__(self, other):
        return _binary(self, divmod, other)

    def __rdivmod__(self, other):
        return _binary(self, divmod, other, reflected=True)


def _index_key(key, sources):
    """An index for the NumPy array: device arrays unwrapped, NumPy arrays refused.

    An Ellipsis is appended so that integer indexing gives a 0-d *view* rather
    than a NumPy scalar: CuPy's ``x[0, 0]`` is a 0-d array sharing x's memory.
    """
    key = _unwrap(key if isinstance(key, tuple) else (key,), sources)
    if not any(k is Ellipsis for k in key):
        key = (*key, Ellipsis)
    return key


def _binary(self: ndarray, op, other, reflected: bool = False):
    """``self <op> other`` (or ``other <op> self``) for a device array and an operand."""
    if isinstance(other, ndarray):
        other = other._a
    elif isinstance(other, np.ndarray):
        raise _unsupported(other)
    elif not isinstance(other, _SCALAR_TYPES):
        return NotImplemented  # lists, None...: let Python try the other operand
    return _wrap(op(other, self._a) if reflected else op(self._a, other))


def _compare(self: ndarray, op, other):
    """``self <op> other`` for ==, !=, <...: as in CuPy, a 0-d NumPy array counts as a
    scalar here, and other operands raise (``x == None`` is a TypeError, not False)."""
    if isinstance(other, np.ndarray) and other.ndim == 0:
        other = other.item()
    if not isinstance(other, (ndarray, *_SCALAR_TYPES)):
        raise _unsupported(other)
    return _binary(self, op, other)


def _inplace(self: ndarray, iop, other):
    """``self <op>= other``: writes into self's NumPy array and returns self (identity kept)."""
    if isinstance(other, ndarray):
        other = other._a
    elif isinstance(other, np.ndarray):
        raise _unsupported(other)
    elif not isinstance(other, _SCALAR_TYPES):
        return NotImplemented
    result = iop(self._a, other)
    assert result is self._a, "NumPy in-place operators return the same array"
    return self


def _install_operators():
    """Give `ndarray` every arithmetic, bitwise and comparison operator, as NumPy has."""
    arithmetic = ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow")
    bitwise = ("lshift", "rshift", "and", "or", "xor")
    for name in arithmetic + bitwise:
        op = getattr(operator, name + "_" if name in ("and", "or") else name)
        iop = getattr(operator, f"i{name}")
        setattr(ndarray, f"__{name}__", functools.partialmethod(_binary, op))
        setattr(ndarray, f"__r{name}__", functools.partialmethod(_binary, op, reflected=True))
        setattr(ndarray, f"__i{name}__", functools.partialmethod(_inplace, iop))
    for name in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(ndarray, f"__{name}__", functools.partialmethod(_compare, getattr(operator, name)))


_install_operators()


# ---------------------------------------------------------------------------
# Module-level API: transfers, creation, everything else from NumPy
# ---------------------------------------------------------------------------


def _host_tree(obj):
    """Device arrays inside (nested) lists/tuples replaced by their NumPy arrays."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_tree(item) for item in obj) if type(obj) in (list, tuple) else obj
    return obj


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    """A device array from anything: host data is always copied (an upload)."""
    if isinstance(obj, ndarray):
        same_dtype = dtype is None or np.dtype(dtype) == obj.dtype
        if not copy and same_dtype and ndmin <= obj.ndim:
            return obj
        return _wrap(np.array(obj._a, dtype=dtype, copy=True, order=order, ndmin=ndmin))
    return _wrap(np.array(_host_tree(obj), dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asarray(a, dtype=None, order=None, *, blocking=False):
    """`a` itself when it is already a device array of that dtype, else a device copy."""
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype, copy=True, order=order or "K")


asanyarray = asarray


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True) -> np.ndarray:
    """A NumPy array: a host copy of a device array; other inputs through np.asarray."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    if out is not None:
        np.copyto(out, a)
        return out
    return np.asarray(a, order=order)


def get_array_module(*args):
    """fakecupy when any argument is a device array, else numpy (cupy.get_array_module)."""
    if any(isinstance(arg, ndarray) for arg in args):
        return sys.modules[__name__]
    return np


def _poisoned_empty(shape, dtype, order="C") -> np.ndarray:
    """np.empty, with floating (and complex) arrays filled with NaN so stale reads show."""
    out = np.empty(shape, dtype=dtype, order=order)
    if out.dtype.kind in "fc":
        out.fill(np.nan)
    return out


def empty(shape, dtype=float, order="C"):
    """Uninitialised device array (NaN-filled when floating; see the module docstring)."""
    return _wrap(_poisoned_empty(shape, dtype, order))


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    """Uninitialised array like `prototype` (a device array), NaN-filled when floating."""
    if not isinstance(prototype, ndarray):
        raise _unsupported(prototype)
    out = np.empty_like(prototype._a, dtype=dtype, order=order, shape=shape)
    if out.dtype.kind in "fc":
        out.fill(np.nan)
    return _wrap(out)


def is_available() -> bool:
    """cupy.is_available(): a GPU is usable. The fake one always is."""
    return True


def fuse(*args, **kwargs):
    """cupy.fuse stand-in: no kernel is compiled, the function runs as written.

    Works both as ``@fuse`` and as ``@fuse(kernel_name=...)``.
    """
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda func: func


# CuPy names this double deliberately leaves out (they compile CUDA code).
_NOT_MODELLED = {"ElementwiseKernel", "ReductionKernel", "RawKernel", "RawModule"}

# NumPy submodules exposed under the same name; others raise AttributeError.
_SUBMODULES = ("linalg", "random", "fft")


def __getattr__(name):
    """PEP 562: any other name is NumPy's, wrapped for device arrays (then cached)."""
    if name in _NOT_MODELLED:
        raise AttributeError(f"fakecupy does not model kernel compilation ({name})")
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    obj = getattr(np, name, None)
    if obj is None and name != "newaxis":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if isinstance(obj, types.ModuleType):  # a module's __getattr__ raises AttributeError
        raise AttributeError(  # noqa: TRY004
            f"fakecupy models only the {', '.join(_SUBMODULES)} submodules, not {name!r}"
        )
    wrapped = _device_attribute(obj)
    globals()[name] = wrapped
    return wrapped


def __dir__():
    return sorted(set(globals()) | set(dir(np)))


class _DeviceNamespace(types.ModuleType):
    """fakecupy.linalg / .random / .fft: the NumPy submodule, wrapped like the top level."""

    def __init__(self, name: str, np_module: types.ModuleType):
        super().__init__(name, f"{np_module.__name__}, for fakecupy device arrays.")
        self._np_module = np_module

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        try:
            obj = getattr(self._np_module, attr)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}") from None
        wrapped = _device_attribute(obj)
        setattr(self, attr, wrapped)
        return wrapped

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self._np_module)))


def _register(module: types.ModuleType) -> types.ModuleType:
    """Make ``import fakecupy.<sub>`` work."""
    sys.modules[module.__name__] = module
    return module


linalg = _register(_DeviceNamespace(f"{__name__}.linalg", np.linalg))
random = _register(_DeviceNamespace(f"{__name__}.random", np.random))
fft = _register(_DeviceNamespace(f"{__name__}.fft", np.fft))


# ---------------------------------------------------------------------------
# fakecupy.cuda: one device, synchronous streams, events, a memory pool
# ---------------------------------------------------------------------------

_CUDA_ERRORS = {  # status -> (name, description), as cudaGetErrorName/String say
    2: ("cudaErrorMemoryAllocation", "out of memory"),
    100: ("cudaErrorNoDevice", "no CUDA-capable device is detected"),
    101: ("cudaErrorInvalidDevice", "invalid device ordinal"),
    400: ("cudaErrorInvalidResourceHandle", "invalid resource handle"),
}


class CUDARuntimeError(RuntimeError):
    """fakecupy.cuda.runtime.CUDARuntimeError(status), like CuPy's."""

    def __init__(self, status: int):
        self.status = status
        name, text = _CUDA_ERRORS.get(status, ("cudaErrorUnknown", "unknown error"))
        super().__init__(f"{name}: {text}")


class OutOfMemoryError(MemoryError):
    """fakecupy.cuda.memory.OutOfMemoryError, raised when the pool's limit is passed."""

    def __init__(self, size: int, total: int, limit: int = 0):
        super().__init__(
            f"Out of memory allocating {size:,} bytes "
            f"(allocated so far: {total:,} bytes, limit set to: {limit:,} bytes)."
        )


class _MemoryPool:
    """fakecupy.cuda.MemoryPool. The default pool tracks live device buffers, roughly.

    Every NumPy buffer that some device array was created on is counted once
    (rounded up to 512 bytes, as CuPy does) until NumPy frees it; views add
    nothing. ``total_bytes`` imitates the caching allocator: it is the
    high-water mark of ``used_bytes`` since the last ``free_all_blocks()``.
    Only the default pool counts; other instances stay at zero.
    """

    def __init__(self):
        self._live = {}  # id(root NumPy buffer) -> rounded bytes
        self._used = 0
        self._held = 0
        self._limit = 0

    def _track(self, array: np.ndarray) -> None:
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        key = id(root)
        if key in self._live:
            return
        size = -(-root.nbytes // _ALLOCATION_UNIT) * _ALLOCATION_UNIT
        limit = self.get_limit()
        if self._used + size > limit:
            raise OutOfMemoryError(size, self._used, limit)
        self._live[key] = size
        self._used += size
        self._held = max(self._held, self._used)
        weakref.finalize(root, self._release, key).atexit = False

    def _release(self, key) -> None:
        self._used -= self._live.pop(key)

    def used_bytes(self) -> int:
        return self._used

    def total_bytes(self) -> int:
        return self._held

    def free_bytes(self) -> int:
        return self._held - self._used

    def n_free_blocks(self) -> int:
        return int(self._held > self._used)

    def free_all_blocks(self, stream=None) -> None:
        self._held = self._used

    def set_limit(self, size=None, fraction=None) -> None:
        if fraction is not None:
            size = int(fraction * _DEVICE_MEMORY)
        self._limit = int(size or 0)

    def get_limit(self) -> int:
        return self._limit or _DEVICE_MEMORY


class _PinnedMemoryPool:
    """fakecupy.cuda.PinnedMemoryPool: there is no pinned host memory here; always empty."""

    def n_free_blocks(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


_default_memory_pool = _MemoryPool()
_default_pinned_memory_pool = _PinnedMemoryPool()


def get_default_memory_pool() -> _MemoryPool:
    """The pool device arrays are counted in (cupy.get_default_memory_pool)."""
    return _default_memory_pool


def get_default_pinned_memory_pool() -> _PinnedMemoryPool:
    return _default_pinned_memory_pool


class _Device:
    """fakecupy.cuda.Device(id): device 0 exists; others fail when used, as in CUDA."""

    compute_capability = "80"

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def _check(self):
        if not 0 <= self.id < _DEVICE_COUNT:
            raise CUDARuntimeError(101)

    def use(self):
        self._check()

    def synchronize(self):
        self._check()  # every operation already ran to completion

    @property
    def mem_info(self):
        """(free, total) bytes, as cudaMemGetInfo."""
        return _mem_get_info()

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        return False

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return hash(("fakecupy.cuda.Device", self.id))

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class _Stream:
    """fakecupy.cuda.Stream: work is never queued, so there is nothing to wait for."""

    null: _Stream  # the default stream, set below
    _stack: ClassVar[list] = []  # streams entered with `with`

    def __init__(self, null=False, non_blocking=False, ptr=None, priority=None):
        self.ptr = 0 if null else id(self)
        self.done = True

    def synchronize(self):
        pass

    def use(self):
        _Stream._stack[:] = [self]
        return self

    def record(self, event=None):
        event = _Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def __enter__(self):
        _Stream._stack.append(self)
        return self

    def __exit__(self, *exc):
        _Stream._stack.pop()
        return False

    def __repr__(self):
        return f"<fakecupy.cuda.Stream {'null' if self.ptr == 0 else hex(self.ptr)}>"


_Stream.null = _Stream(null=True)


def _get_current_stream():
    return _Stream._stack[-1] if _Stream._stack else _Stream.null


class _Event:
    """fakecupy.cuda.Event: record() notes time.perf_counter(); no GPU clock."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._disable_timing = disable_timing
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        pass

    @property
    def done(self):
        return self._time is not None


def _get_elapsed_time(start_event: _Event, end_event: _Event) -> float:
    """Milliseconds between two recorded events (cupy.cuda.get_elapsed_time)."""
    for event in (start_event, end_event):
        if event._time is None or event._disable_timing:
            raise CUDARuntimeError(400)
    return (end_event._time - start_event._time) * 1000.0


def _mem_get_info():
    return _DEVICE_MEMORY - _default_memory_pool.total_bytes(), _DEVICE_MEMORY


def _get_device_count() -> int:
    return _DEVICE_COUNT


def _new_module(name: str, doc: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(f"{__name__}.{name}", doc)
    module.__dict__.update(attrs)
    return _register(module)


cuda = _new_module(
    "cuda",
    "Minimal stand-in for cupy.cuda: one device, synchronous streams, events, memory pools.",
    Device=_Device,
    Stream=_Stream,
    Event=_Event,
    MemoryPool=_MemoryPool,
    PinnedMemoryPool=_PinnedMemoryPool,
    get_current_stream=_get_current_stream,
    get_elapsed_time=_get_elapsed_time,
    is_available=is_available,
    runtime=_new_module(
        "cuda.runtime",
        "Stand-in for cupy.cuda.runtime.",
        CUDARuntimeError=CUDARuntimeError,
        is_hip=False,
        getDeviceCount=_get_device_count,
        getDevice=lambda: 0,
        deviceSynchronize=lambda: None,
        memGetInfo=_mem_get_info,
        runtimeGetVersion=lambda: 12040,
        driverGetVersion=lambda: 12040,
        getDeviceProperties=lambda device: {
            "name": f"{_DEVICE_NAME} (NumPy on the host)".encode(),
            "totalGlobalMem": _DEVICE_MEMORY,
            "major": 8,
            "minor": 0,
            "multiProcessorCount": 1,
        },
    ),
    memory=_new_module(
        "cuda.memory",
        "Stand-in for cupy.cuda.memory.",
        MemoryPool=_MemoryPool,
        OutOfMemoryError=OutOfMemoryError,
    ),
)
