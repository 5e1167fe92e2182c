"""Tests of the CuPy test double itself (tests/fakecupy.py).

The double is only useful if it fails where CuPy fails (host/device mixing,
implicit conversion) and works where CuPy works (views, in-place updates,
out=, 0-d reductions). These tests pin both sides. They do not import tinylm.
"""

import copy
import pickle

import fakecupy as cp
import numpy as np
import pytest

IMPLICIT = "Implicit conversion to a NumPy array is not allowed"
UNSUPPORTED = "Unsupported type <class 'numpy.ndarray'>"


@pytest.fixture
def x():
    """(3, 4) float32 device array 0..11."""
    return cp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))


def host(a) -> np.ndarray:
    return cp.asnumpy(a)


# ---------------------------------------------------------------------------
# Identity of the module and the array type
# ---------------------------------------------------------------------------


def test_module_identity():
    assert cp.__name__ == "fakecupy"
    assert cp.IS_TEST_DOUBLE is True
    assert not issubclass(cp.ndarray, np.ndarray)


def test_repr_names_the_fake_device(x):
    assert "device='fake-gpu'" in repr(x)
    assert repr(x).startswith("array(")


# ---------------------------------------------------------------------------
# Refusals: implicit conversion and host/device mixing
# ---------------------------------------------------------------------------


def test_implicit_conversion_to_numpy_is_refused(x):
    with pytest.raises(TypeError, match=IMPLICIT):
        np.asarray(x)
    with pytest.raises(TypeError, match=IMPLICIT):
        np.array(x, dtype=np.float64)
    with pytest.raises(TypeError):
        np.testing.assert_allclose(x, np.zeros((3, 4)))


@pytest.mark.parametrize(
    "op",
    [
        lambda d, h: d + h,
        lambda d, h: h + d,
        lambda d, h: d * h,
        lambda d, h: h - d,
        lambda d, h: d @ h.T,
        lambda d, h: h.T @ d,
        lambda d, h: d < h,
        lambda d, h: h == d,
    ],
    ids=["d+h", "h+d", "d*h", "h-d", "d@h", "h@d", "d<h", "h==d"],
)
def test_mixing_with_numpy_arrays_raises_in_both_orders(x, op):
    with pytest.raises(TypeError, match="Unsupported type"):
        op(x, np.ones((3, 4), dtype=np.float32))


def test_inplace_mixing_raises_both_ways(x):
    h = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        x += h
    with pytest.raises(TypeError, match=UNSUPPORTED):
        h += x


def test_module_functions_refuse_numpy_arguments(x):
    h = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.exp(h)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.maximum(x, h)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.matmul(x, h.T)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.zeros_like(h)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.stack([x, h])  # nested in a list
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.exp(x, out=np.empty((3, 4), dtype=np.float32))  # out= must be a device array
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.linalg.norm(h)


def test_numpy_functions_dispatch_on_device_arrays_but_refuse_mixing(x):
    total = np.sum(x)
    assert isinstance(total, cp.ndarray) and total.ndim == 0
    assert float(total) == 66.0
    both = np.concatenate([x, x])
    assert isinstance(both, cp.ndarray) and both.shape == (6, 4)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        np.concatenate([x, np.ones((1, 4), dtype=np.float32)])


def test_numpy_ufunc_methods_are_refused_like_cupy(x):
    # CuPy's __array_ufunc__ takes plain calls only; xp.add.at is the way.
    with pytest.raises(TypeError):
        np.add.at(x, cp.asarray([0]), 1.0)
    with pytest.raises(TypeError):
        np.add.reduce(x)


def test_indexing_with_numpy_index_or_value_raises(x):
    with pytest.raises(TypeError, match=UNSUPPORTED):
        x[np.array([0, 2])]
    with pytest.raises(TypeError, match=UNSUPPORTED):
        x[np.array([0, 2]), 1:]
    with pytest.raises(TypeError, match=UNSUPPORTED):
        x[0] = np.zeros(4, dtype=np.float32)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        x[cp.asarray([0])] = np.zeros(4, dtype=np.float32)


def test_scalars_mix_freely(x):
    for result in (
        x * 2,
        2 * x,
        x + 0.5,
        1.0 - x,
        x / np.float32(2.0),
        np.float32(2.0) * x,
        np.float64(1.0) + x,
        x**2,
        -x,
        abs(x),
    ):
        assert isinstance(result, cp.ndarray)
    np.testing.assert_array_equal(host(np.float32(2.0) * x), 2 * host(x))
    # comparisons with NumPy scalars (CuPy's numpy#12142 workaround)
    assert isinstance(np.float32(3) > x, cp.ndarray)
    np.testing.assert_array_equal(host(x == np.array(5.0)), host(x) == 5.0)


def test_comparison_with_none_raises_like_cupy(x):
    with pytest.raises(TypeError):
        x == None  # noqa: B015, E711 (deliberate: CuPy raises here)


def test_no_index_protocol_like_cupy():
    n = cp.asarray(3)
    with pytest.raises(TypeError):
        range(n)
    assert range(int(n)) == range(3)  # the explicit way


# ---------------------------------------------------------------------------
# Identity, in-place updates and views
# ---------------------------------------------------------------------------


def test_inplace_operators_keep_identity_and_buffer(x):
    ref, buf = x, x._a
    g = cp.ones((3, 4), dtype=cp.float32)
    x -= 0.1 * g
    x *= 2
    x /= 2
    x += g
    x **= 1
    assert x is ref and x._a is buf
    np.testing.assert_allclose(host(x), np.arange(12).reshape(3, 4) + 0.9, rtol=1e-6)
    x[...] = 0
    assert x is ref and not host(x).any()
    g.fill(0)
    assert not host(g).any()


def test_views_alias_their_base(x):
    v = x[:, :2]
    assert isinstance(v, cp.ndarray) and v.base is x
    v += 100
    assert host(x)[0, 0] == 100 and host(x)[0, 2] == 2
    x.T[3, 0] = -1  # transposed view
    assert host(x)[0, 3] == -1
    r = x.reshape(12)
    r[5] = -5
    assert host(x)[1, 1] == -5 and r.base is x
    v.transpose(1, 0).swapaxes(0, 1)[...] = 7
    assert (host(x)[:, :2] == 7).all()


def test_integer_indexing_gives_a_0d_view(x):
    e = x[1, 2]
    assert isinstance(e, cp.ndarray) and e.shape == ()
    e[...] = 42
    assert host(x)[1, 2] == 42


def test_fancy_and_boolean_indexing_with_device_arrays(x):
    rows = x[cp.asarray([2, 0, 2])]
    np.testing.assert_array_equal(host(rows), host(x)[[2, 0, 2]])
    np.testing.assert_array_equal(host(x[x > 5]), np.arange(6, 12))
    x[cp.asarray([0, 1])] = cp.zeros(4, dtype=cp.float32)
    assert not host(x)[:2].any()


def test_setitem_accepts_scalars_and_device_arrays(x):
    x[0] = 5
    x[1, :] = cp.arange(4, dtype=cp.float32)
    x[2, 1:3] = [8.0, 9.0]
    np.testing.assert_array_equal(host(x)[0], 5)
    np.testing.assert_array_equal(host(x)[1], np.arange(4))
    np.testing.assert_array_equal(host(x)[2, 1:3], [8, 9])


# ---------------------------------------------------------------------------
# Ufuncs, reductions, out=
# ---------------------------------------------------------------------------


def test_add_at_sums_repeated_indices():
    target = cp.zeros((4, 2), dtype=cp.float32)
    ids = cp.asarray([0, 2, 0, 0])
    values = cp.asarray(np.arange(8, dtype=np.float32).reshape(4, 2))
    assert cp.add.at(target, ids, values) is None
    expected = np.zeros((4, 2), dtype=np.float32)
    np.add.at(expected, [0, 2, 0, 0], np.arange(8, dtype=np.float32).reshape(4, 2))
    np.testing.assert_array_equal(host(target), expected)
    assert host(target)[0].tolist() == [0 + 4 + 6, 1 + 5 + 7]


def test_ufunc_at_follows_cupy_limits():
    with pytest.raises(TypeError, match="add.at only supports"):
        cp.add.at(cp.zeros(3, dtype=cp.int64), cp.asarray([0]), 1)
    with pytest.raises(NotImplementedError):
        cp.multiply.at(cp.zeros(3), cp.asarray([0]), 2.0)
    with pytest.raises(TypeError, match=UNSUPPORTED):
        cp.add.at(cp.zeros(3, dtype=cp.float32), np.array([0]), 1.0)


def test_other_ufunc_methods_work():
    a = cp.arange(6, dtype=cp.float32).reshape(2, 3)
    np.testing.assert_array_equal(host(cp.add.reduce(a, axis=0)), [3, 5, 7])
    np.testing.assert_array_equal(
        host(cp.multiply.outer(cp.arange(2), cp.arange(3))), np.outer(np.arange(2), np.arange(3))
    )
    np.testing.assert_array_equal(host(cp.add.accumulate(cp.arange(4))), [0, 1, 3, 6])
    assert cp.add.nin == 2 and cp.exp.__name__ == "exp"


def test_reductions_return_0d_device_arrays(x):
    for r in (x.sum(), x.max(), x.mean(), x.argmax(), cp.linalg.norm(x), x.sum(axis=(0, 1))):
        assert isinstance(r, cp.ndarray) and r.ndim == 0
    assert float(x.sum()) == 66.0
    assert int(x.argmax()) == 11
    assert x.max().item() == 11.0
    assert bool(cp.isfinite(x).all()) is True
    assert f"{x.mean():.2f}" == "5.50"
    assert x.max(axis=-1, keepdims=True).shape == (3, 1)
    with pytest.raises(TypeError):
        float(x)  # more than one element


def test_ufunc_out_writes_in_place_and_returns_out(x):
    buf = cp.empty((3, 4), dtype=cp.float32)
    assert cp.exp(x / 10, out=buf) is buf
    np.testing.assert_allclose(host(buf), np.exp(host(x) / 10), rtol=1e-6)
    assert np.exp(x, out=x) is x  # NumPy's ufunc dispatches to the double too
    col = cp.zeros(4, dtype=cp.float32)
    assert x.sum(axis=0, out=col) is col
    assert cp.matmul(x, x.T, out=cp.empty((3, 3), dtype=cp.float32)).shape == (3, 3)


def test_matmul_and_einsum_match_numpy():
    rng = np.random.default_rng(0)
    a_h, b_h = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 5))
    a, b = cp.asarray(a_h), cp.asarray(b_h)
    for got, want in (
        (a @ b, a_h @ b_h),
        (cp.matmul(a, b), np.matmul(a_h, b_h)),
        (cp.einsum("bij,bjk->bik", a, b), np.einsum("bij,bjk->bik", a_h, b_h)),
        (a @ b + 1.0, a_h @ b_h + 1.0),
    ):
        assert isinstance(got, cp.ndarray)
        np.testing.assert_allclose(host(got), want)


def test_methods_forward_and_wrap(x):
    assert isinstance(x.astype(cp.float64), cp.ndarray)
    assert x.astype(cp.float32, copy=False) is x
    assert x.transpose(1, 0).shape == (4, 3)
    assert x.swapaxes(0, 1).shape == (4, 3)
    assert isinstance(x.copy(), cp.ndarray) and x.copy().base is None
    assert x.ravel().shape == (12,)
    nz = (x > 9).nonzero()
    assert isinstance(nz, tuple) and all(isinstance(i, cp.ndarray) for i in nz)
    assert x.tolist()[0] == [0.0, 1.0, 2.0, 3.0]
    assert (x.shape, x.dtype, x.ndim, x.size) == ((3, 4), np.float32, 2, 12)
    assert (x.itemsize, x.nbytes, x.strides) == (4, 48, (16, 4))
    assert x.flags.c_contiguous


# ---------------------------------------------------------------------------
# Transfers and module attributes
# ---------------------------------------------------------------------------


def test_transfers_round_trip_and_copy():
    h = np.arange(6, dtype=np.float32)
    d = cp.asarray(h)
    h[0] = 99  # the upload was a copy
    assert host(d)[0] == 0
    back = d.get()
    assert isinstance(back, np.ndarray)
    back[1] = 99  # the download is a copy too
    assert host(d)[1] == 1
    np.testing.assert_array_equal(cp.asnumpy(d), np.arange(6))
    assert isinstance(cp.asnumpy(h), np.ndarray)  # host input accepted, as in CuPy
    assert cp.asarray(d) is d
    assert cp.asarray(d, dtype=cp.float64).dtype == np.float64
    assert cp.array([1, 2, 3]).dtype.kind == "i"
    assert cp.array(d) is not d  # array() copies by default
    d.set(np.full(6, 7, dtype=np.float32))
    assert (host(d) == 7).all()


def test_len_and_iteration_yield_device_rows(x):
    assert len(x) == 3
    rows = list(x)
    assert all(isinstance(r, cp.ndarray) and r.shape == (4,) for r in rows)
    with pytest.raises(TypeError):
        iter(cp.asarray(1.0))


def test_copy_and_pickle_make_device_copies(x):
    for c in (copy.copy(x), copy.deepcopy(x), pickle.loads(pickle.dumps(x))):
        assert isinstance(c, cp.ndarray) and c is not x
        np.testing.assert_array_equal(host(c), host(x))


def test_module_attributes_pass_through_or_wrap():
    assert cp.float32 is np.float32 and cp.dtype is np.dtype
    assert cp.pi == np.pi and cp.inf == np.inf and cp.newaxis is None
    assert isinstance(cp.zeros(3), cp.ndarray)
    assert isinstance(cp.random.rand(2), cp.ndarray)
    assert isinstance(cp.random.default_rng(0).standard_normal(3), cp.ndarray)
    assert isinstance(cp.fft.fft(cp.arange(4.0)), cp.ndarray)
    assert cp.get_array_module(cp.zeros(1)) is cp
    assert cp.get_array_module(np.zeros(1)) is np
    with pytest.raises(AttributeError):
        cp.RawKernel  # noqa: B018 - no kernel compilation
    with pytest.raises(AttributeError):
        cp.no_such_function  # noqa: B018


def test_empty_is_nan_poisoned():
    assert np.isnan(host(cp.empty((2, 2)))).all()
    assert np.isnan(host(cp.empty_like(cp.zeros(3, dtype=cp.float32)))).all()


# ---------------------------------------------------------------------------
# fakecupy.cuda
# ---------------------------------------------------------------------------


def test_cuda_runtime_device_stream_event():
    assert cp.cuda.runtime.getDeviceCount() == 1
    assert issubclass(cp.cuda.runtime.CUDARuntimeError, RuntimeError)
    cp.cuda.Device(0).synchronize()
    cp.cuda.Stream.null.synchronize()
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError):
        cp.cuda.Device(1).use()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    end.record()
    end.synchronize()
    assert cp.cuda.get_elapsed_time(start, end) >= 0.0
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError):
        cp.cuda.get_elapsed_time(cp.cuda.Event(), end)  # never recorded


def test_memory_pool_tracks_live_buffers():
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    a = cp.zeros((1000, 1000), dtype=cp.float32)  # 4 MB
    assert pool.used_bytes() - before >= 4_000_000
    view = a[:10]  # views allocate nothing
    assert pool.used_bytes() - before < 4_001_000
    del a, view
    assert pool.used_bytes() == before
    assert pool.total_bytes() >= before + 4_000_000  # cached, as CuPy's pool keeps blocks
    pool.free_all_blocks()
    assert pool.total_bytes() == pool.used_bytes()
