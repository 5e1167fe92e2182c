"""Evaluation over a whole token split: loss, perplexity, bits per byte, accuracy.

Training's `estimate_loss` averages a few random batches (cheap, noisy). Here every
token of the split is predicted exactly once, so two runs (or a float and a
quantized model) are compared on the same text with no sampling noise:

    tokens   t0 t1 t2 ... t(N-1)                (the validation split)
    windows  x = tokens[s : s+T],  y = tokens[s+1 : s+T+1],  s = 0, T, 2T, ...
             non-overlapping; the last one shorter when N - 1 is not a multiple of T

Each target t1 .. t(N-1) appears in exactly one window; t0 is never a target (nothing
before it in the split). Within a window a token sees only the tokens before it in
that window, as in training, so the first positions of each window predict from little
context; the mean over all positions is the quantity that training's random windows
estimate (each random window also covers positions 0..T-1 once).

    loss           total nats / predicted tokens (the mean cross-entropy)
    perplexity     exp(loss)
    bits per byte  total nats / ln 2 / UTF-8 bytes of the predicted tokens
    accuracy       fraction of positions whose most likely next token is the target

Bits per byte compares models with different tokenizers: a tokenizer with longer
tokens has a higher loss per token but fewer tokens per byte. The bytes are those of
the predicted tokens' text, token by token (`token_bytes`):
  - char tokenizer: each token is one character, 1 to 4 bytes in UTF-8 (1 for ASCII,
    so on Tiny Shakespeare bits per byte = bits per character)
  - byte-level BPE: each token stands for a fixed byte string (`decode_bytes`), and a
    text's bytes are its tokens' byte strings end to end, so the count is exact even
    when a token holds part of a multi-byte character; a special token counts its
    literal text ("<|endoftext|>": 13 bytes), as it appears in the data file
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from tinylm.backend import to_device, to_numpy, xp_of

__all__ = ["EvalResult", "evaluate_tokens", "token_bytes"]


@dataclass(frozen=True)
class EvalResult:
    """The numbers of one whole-split evaluation (see the module docstring)."""

    loss: float  # mean cross-entropy, nats per predicted token
    perplexity: float
    bits_per_byte: float | None  # None without a tokenizer (bytes unknown)
    accuracy: float  # next-token top-1 accuracy
    tokens: int  # predicted tokens: len(split) - 1
    bytes: int | None  # UTF-8 bytes of the predicted tokens
    windows: int  # forward passes' rows (sequences) evaluated
    context_length: int  # T of the windows

    def to_dict(self) -> dict:
        return asdict(self)


def token_bytes(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """(V,) int64: the UTF-8 length of each token id's text (0 past the tokenizer's ids,
    e.g. a model vocabulary padded beyond the tokenizer's)."""
    n = tokenizer.vocab_size if vocab_size is None else max(vocab_size, tokenizer.vocab_size)
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        lengths[i] = len(tokenizer.decode_bytes([i]))
    return lengths


def evaluate_tokens(model, tokens, tokenizer=None, *, batch_size: int = 8,
                    context_length: int | None = None) -> EvalResult:
    """Evaluate `model` on every token of `tokens` (a 1-D array of ids, e.g. the
    validation split; a memmap is read window by window).

    `context_length` (T) defaults to the model's; `batch_size` windows go through the
    model at once. Without `tokenizer` bits per byte is None. The model is put in eval
    mode (dropout off) and back in its previous mode afterwards."""
    T = model.config.context_length if context_length is None else int(context_length)
    if not 1 <= T <= model.config.context_length:
        raise ValueError(f"context_length must be in [1, {model.config.context_length}], got {T}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(tokens)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to evaluate (one to predict), got {n}")
    n_pred = n - 1
    starts = list(range(0, n_pred, T))  # window s predicts tokens s+1 .. s+T
    full = [s for s in starts if s + T <= n_pred]  # whole windows, batched
    rest = starts[len(full):]  # at most one shorter window at the end

    nats, correct = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(full), batch_size):
            rows = np.asarray(full[i:i + batch_size])  # (B,)
            window = np.asarray(tokens[rows[:, None] + np.arange(T + 1)], dtype=np.int64)
            n_ok, n_nats = _score(model, window)  # window (B, T+1)
            nats, correct = nats + n_nats, correct + n_ok
        for s in rest:
            window = np.asarray(tokens[s:n], dtype=np.int64)[None]  # (1, n - s)
            n_ok, n_nats = _score(model, window)
            nats, correct = nats + n_nats, correct + n_ok
    finally:
        model.clear_backward_caches()
        model.train(was_training)

    n_bytes = bits = None
    if tokenizer is not None:
        lengths = token_bytes(tokenizer, model.config.vocab_size)
        targets = np.asarray(tokens[1:n], dtype=np.int64)
        n_bytes = int(lengths[targets].sum())
        bits = nats / math.log(2) / n_bytes if n_bytes else None
    loss = nats / n_pred
    return EvalResult(
        loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf,
        bits_per_byte=bits, accuracy=correct / n_pred, tokens=n_pred, bytes=n_bytes,
        windows=len(starts), context_length=T)


def _score(model, window) -> tuple[int, float]:
    """window (B, t+1) host ids -> (correct top-1 predictions, total nats) of its t targets."""
    xp = model.xp
    x = to_device(window[:, :-1], xp)  # (B, t)
    y = to_device(window[:, 1:], xp)  # (B, t)
    logits = model.forward(x)  # (B, t, V)
    model.clear_backward_caches()  # inference: keep no activations
    return _nats_and_hits(logits, y)


def _nats_and_hits(logits, y) -> tuple[int, float]:
    """-sum log softmax(logits)[y] (in float64 on the host) and the count of argmax == y."""
    xp = xp_of(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (N, V)
    target = y.reshape(-1)  # (N,)
    zmax = z.max(axis=-1)  # (N,) log-sum-exp, stabilised by the row max
    lse = zmax + xp.log(xp.exp(z - zmax[:, None]).sum(axis=-1))  # (N,)
    nll = lse - z[xp.arange(len(target)), target]  # (N,) nats
    hits = int((z.argmax(axis=-1) == target).sum())
    return hits, float(to_numpy(nll).astype(np.float64).sum())


# ---------------------------------------------------------------------------
# A checkpoint on a text file (`tinylm eval`)
# ---------------------------------------------------------------------------


def evaluate_checkpoint(path, data=None, *, device: str = "cpu", batch_size: int = 8,
                        context_length: int | None = None, val_fraction: float | None = None,
                        report=None) -> dict:
    """Evaluate a checkpoint (float or quantized) on the whole validation split of a text.

    `data`: a UTF-8 file; None: the text the checkpoint was trained on (its trainer.json;
    the bundled Tiny Shakespeare when it says none). The split is the one training used:
    the last `val_fraction` of the tokens (by default the checkpoint's, else 0.1).
    Returns EvalResult.to_dict() plus "checkpoint", "data", "val_fraction",
    "quantization" and "weights_bytes" (the weights as stored: codes, scales, floats)."""
    import tempfile
    from pathlib import Path

    from tinylm import checkpoint
    from tinylm.data import prepare, resolve_data_path
    from tinylm.quant import model_nbytes

    ckpt = checkpoint.load(path, device=device)
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path}: the checkpoint has no tokenizer, so the text cannot be "
                         "encoded")
    state = ckpt.trainer_state or {}
    trained = state.get("config") or {}
    if data is None and trained.get("data") is not None:
        from tinylm.training.resume import saved_data_path

        # only the very file the run was trained on (its size and SHA-256 as recorded):
        # a checkpoint's trainer.json must not make us read any file it names
        data = saved_data_path(state, ckpt.path / "trainer.json")
    frac = val_fraction if val_fraction is not None else trained.get("val_fraction", 0.1)
    source = resolve_data_path(data)
    with tempfile.TemporaryDirectory(prefix="tinylm-eval-") as tmp:
        tokens = prepare(source, ckpt.tokenizer, Path(tmp), val_fraction=frac, report=report)
        val = np.array(tokens.val)  # a copy: the memmap's file goes with the directory
        del tokens
    result = evaluate_tokens(ckpt.model, val, ckpt.tokenizer, batch_size=batch_size,
                             context_length=context_length)
    return {"checkpoint": str(ckpt.path), "data": str(source), "val_fraction": frac,
            "quantization": getattr(ckpt.model, "quantization", None),
            "weights_bytes": model_nbytes(ckpt.model), **result.to_dict()}
