"""Shared fixtures: the backends every engine test runs on.

`device` is parametrised over
  - "cpu"        NumPy
  - "fake-cuda"  the device="cuda" code path with tests/fakecupy.py standing in
                 for CuPy (CI has no GPU; the double refuses implicit NumPy
                 conversion and NumPy/device mixing, the classic CuPy bugs)
  - "cuda"       real CuPy, only when CuPy imports and sees a GPU (else skipped)
and yields the device name to pass to tinylm ("cpu" or "cuda").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `import fakecupy`

import fakecupy  # noqa: E402

from tinylm import backend  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tinylm" / "data" / "tinyshakespeare.txt"


def _real_cuda() -> bool:
    try:
        return backend.cuda_available()
    except Exception:
        return False


# the real-GPU case carries the `gpu` marker, so `pytest -m gpu` runs exactly those
@pytest.fixture(params=["cpu", "fake-cuda", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cpu":
        yield "cpu"
    elif request.param == "fake-cuda":
        with backend.use_cupy(fakecupy):
            yield "cuda"
    else:
        if not _real_cuda():
            pytest.skip("real CuPy with a CUDA GPU is not available")
        yield "cuda"


@pytest.fixture
def fake_cuda():
    """Run a test with the CuPy test double installed as the 'cuda' backend."""
    with backend.use_cupy(fakecupy):
        yield fakecupy
