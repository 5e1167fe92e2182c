"""tinylm: a GPT-style language model engine in NumPy with hand-written backward passes.

    from tinylm import GPT, GPTConfig
    from tinylm.nn import SoftmaxCrossEntropy
    from tinylm.optim import AdamW, clip_grad_norm, cosine_schedule
"""

import os
import sys

# OpenBLAS's worker threads spin for ~0.1 s after every call before they sleep, so through
# a whole training step they hold the second core that tinylm's element-wise threads
# (tinylm/nn/functional.py) want; 2^16 cycles (~25 us) still bridges the gaps between the
# matmuls of one step (docs/benchmarks.md). OpenBLAS reads this once, when NumPy loads:
# so it is set here, before tinylm imports NumPy, unless NumPy is loaded already or the
# user chose a value.
BLAS_THREAD_TIMEOUT = "16"
USER_BLAS_THREAD_TIMEOUT = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_THREAD_TIMEOUT)

from tinylm import sampling  # noqa: E402  (after the setting above)
from tinylm.model import GPT, GPTConfig  # noqa: E402
from tinylm.sampling import generate  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "generate", "sampling", "__version__"]
