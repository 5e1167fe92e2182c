"""Room in a trained model for new token ids (the chat format's special tokens).

`add_chat_tokens` gives a tokenizer six more ids; the model needs a row of the token
embedding for each (and a column of the output head when it is not tied). Existing
rows are kept as they are, so the model computes exactly what it did on every old
token. A new row starts at the mean of the old rows plus a little noise:

  - the mean keeps the new tokens' logits (tied head: h . row) near the average logit,
    so before fine-tuning the model gives each new token about the probability of a
    typical old one, instead of whatever a random row would give (Hewitt 2021,
    "Initializing new word embeddings for pretrained language models");
  - the noise (std 0.02, GPT-2's initial scale, times 0.1) makes the new rows differ,
    so that <|user|> and <|assistant|> do not start as the same input.

The new rows must then be trained: a full fine-tune trains them with everything else;
with LoRA the token embedding is trained as well (see docs/finetuning.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tinylm.backend import device_of, host_rng
from tinylm.model import GPT

NOISE_STD = 0.002


def grow_vocab(model: GPT, vocab_size: int, seed: int = 0) -> GPT:
    """A new GPT like `model` (same device and dtype, weights copied) with `vocab_size`
    ids; `model` itself is unchanged. A vocabulary already that large is returned as is."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size} ids")
    if vocab_size == old:
        return model
    state = model.state_dict()  # NumPy copies
    rng = host_rng(seed)
    new = vocab_size - old
    emb = state["tok_emb.weight"]  # (V, C)
    state["tok_emb.weight"] = np.concatenate([emb, _new_rows(emb, new, rng)])  # (V', C)
    if "head.weight" in state:  # untied head: (C, V) columns, one per id
        head = state["head.weight"].T  # (V, C)
        state["head.weight"] = np.concatenate([head, _new_rows(head, new, rng)]).T  # (C, V')
    config = dataclasses.replace(model.config, vocab_size=vocab_size)
    bigger = GPT(config, device=device_of(model.tok_emb.params["weight"]), dtype=model.dtype)
    bigger.load_state_dict(state)
    return bigger.train(model.training)


def _new_rows(rows: np.ndarray, n: int, rng) -> np.ndarray:
    """(n, C) rows at the mean of `rows` (V, C), plus small noise."""
    mean = rows.astype(np.float64).mean(axis=0)  # (C,)
    return (mean + NOISE_STD * rng.standard_normal((n, rows.shape[1]))).astype(rows.dtype)
