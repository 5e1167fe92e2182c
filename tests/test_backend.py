"""The backend module: device selection, conversions, and the NumPy/CuPy differences."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm import GPT, GPTConfig, backend


def test_get_xp_cpu_and_errors():
    assert backend.get_xp("cpu") is np
    expected = r"device must be one of \('cpu', 'cuda', 'auto'\), got 'gpu'"
    with pytest.raises(ValueError, match=expected):
        backend.get_xp("gpu")


def test_cuda_without_cupy_is_a_clear_error():
    with backend.use_cupy(None):
        with pytest.raises(RuntimeError, match=r'pip install -e "\.\[gpu\]"'):
            backend.get_xp("cuda")
        with pytest.raises(RuntimeError, match="needs CuPy and a CUDA GPU"):
            GPT(GPTConfig(vocab_size=5, context_length=4, d_model=4, n_layers=1, n_heads=1),
                device="cuda")
        assert backend.get_xp("auto") is np


def test_auto_picks_cuda_when_available(fake_cuda):
    assert backend.get_xp("auto") is fake_cuda
    assert backend.resolve_device("auto") == "cuda"


def test_xp_of_and_to_numpy(fake_cuda):
    host = np.arange(6.0).reshape(2, 3)
    dev = fake_cuda.asarray(host)
    assert backend.xp_of(dev) is fake_cuda and backend.xp_of(host) is np
    assert backend.device_of(dev) == "cuda"
    back = backend.to_numpy(dev)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host)
    with pytest.raises(TypeError):
        np.asarray(dev)  # the double refuses implicit conversion, as CuPy does


@pytest.mark.parametrize("n_ids", [1, 7, 1000])
def test_scatter_add_rows_matches_add_at(device, n_ids):
    xp = backend.get_xp(device)
    rng = np.random.default_rng(n_ids)
    ids = rng.integers(0, 5, n_ids)
    values = rng.standard_normal((n_ids, 3))
    expected = np.zeros((5, 3))
    np.add.at(expected, ids, values)
    target = backend.to_device(np.zeros((5, 3)), xp)
    backend.scatter_add_rows(target, backend.to_device(ids, xp), backend.to_device(values, xp))
    np.testing.assert_allclose(backend.to_numpy(target), expected, rtol=1e-12)


def test_resolve_dtype():
    assert backend.resolve_dtype("float64") == np.float64
    with pytest.raises(TypeError, match="float32' or 'float64', got 'int8'"):
        backend.resolve_dtype("int8")
