"""tinylm: a GPT-style language model engine in NumPy with hand-written backward passes.

    from tinylm import GPT, GPTConfig
    from tinylm.nn import SoftmaxCrossEntropy
    from tinylm.optim import AdamW, clip_grad_norm, cosine_schedule
"""

from tinylm import sampling
from tinylm.model import GPT, GPTConfig
from tinylm.sampling import generate

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "generate", "sampling", "__version__"]
