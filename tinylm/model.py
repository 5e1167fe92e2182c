"""The GPT model (Radford et al. 2019, GPT-2), forward and backward, and its modern variants.

    idx (B, T) token ids
    x = tok_emb[idx] + pos_emb[0..T-1]          (B, T, C)   then dropout
    x = Block_i(x) for each of n_layers         (B, T, C)
    h = ln_f(x)                                 (B, T, C)
    logits = h @ tok_emb.weight^T               (B, T, V)   tied head (or h @ head.weight)

The tied head reuses the embedding matrix, so that matrix has two uses and
its gradient is the sum of both: the scatter-add from the lookup and the
matmul from the head (Press & Wolf 2017).

GPTConfig's variant switches (all defaults are GPT-2) change the pieces, not
the flow: `pos` replaces the learned table (sinusoidal, RoPE inside attention,
or nothing), `norm`/`norm_placement`/`mlp` change each block, `n_kv_heads` and
`sliding_window` change attention, `n_experts` turns each MLP into a mixture
of experts whose load-balancing loss is `GPT.aux_loss`. A Llama is
`GPTConfig(..., pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=..., bias=False,
tie_weights=False)`.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import host_rng, to_device, to_numpy, xp_of
from tinylm.config import GPTConfig
from tinylm.nn.activation import Dropout, seed_dropout
from tinylm.nn.block import Block
from tinylm.nn.linear import Embedding, Linear, check_ids
from tinylm.nn.module import Module
from tinylm.nn.norm import make_norm
from tinylm.nn.positions import apply_rope, sinusoidal_positions

__all__ = ["GPT", "GPTConfig"]

class GPT(Module):
    """A GPT-2 style decoder. `GPT(config, seed=0, device="cpu", dtype="float32")`.

    `model.recompute = True` recomputes each block's activations in backward instead of
    keeping them (activation recomputation: `_block_forward`)."""

    def __init__(self, config: GPTConfig, seed: int = 0, device: str = "cpu", dtype="float32"):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = cfg = config
        # the layers' own initial values are all replaced by init_weights below
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = Embedding(cfg.context_length, cfg.d_model)
        elif cfg.pos == "sinusoidal":  # a fixed table: not a parameter, no gradient
            self.buffers["pos_table"] = sinusoidal_positions(  # (T_max, C), cast by `to`
                cfg.context_length, cfg.d_model, dtype="float64")
        # pos="rope" rotates q and k inside attention; pos="none" adds nothing
        self.drop = Dropout(cfg.dropout)
        self.blocks = [Block(cfg.d_model, cfg.n_heads, **cfg.block_kwargs())
                       for _ in range(cfg.n_layers)]
        self.ln_f = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        if not cfg.tie_weights:
            self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.to(device, dtype)
        self.init_weights(seed)
        self.seed_dropout(seed)

    def extra_repr(self) -> str:
        return f"{self.num_parameters():,} parameters, dtype={self.dtype.name}"

    # -- initialisation ---------------------------------------------------

    def init_weights(self, seed: int) -> None:
        """GPT-2 initialisation, drawn on the host in parameter-name order, so one
        seed gives the same weights on every machine and backend:
        weights ~ normal(0, 0.02), residual projections ~ normal(0, 0.02/sqrt(2L)),
        biases 0, LayerNorm/RMSNorm weight 1 and bias 0. The residual projections are
        the matrices whose output is added to the residual stream: attention's and the
        MLP's `proj`, SwiGLU's `down` (in every expert of a MoE)."""
        rng = host_rng(seed)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layers): each block
        # adds two branches to the residual stream, and this keeps its variance flat.
        std_proj = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p, _ in self.parameters():
            if ".ln" in name or name.startswith("ln_"):
                value = np.ones(p.shape) if name.endswith("weight") else np.zeros(p.shape)
            elif name.endswith("bias"):
                value = np.zeros(p.shape)
            else:
                std = std_proj if name.endswith(("proj.weight", "down.weight")) else 0.02
                value = rng.standard_normal(p.shape) * std
            p[...] = to_device(value.astype(p.dtype), self.xp)

    def seed_dropout(self, seed: int) -> None:
        """Restart every dropout layer's mask stream (each layer its own stream)."""
        seed_dropout(self, seed)

    # -- forward / backward -------------------------------------------------

    def forward(self, idx):
        """idx (B, T) integer token ids -> logits (B, T, V)."""
        idx = self._token_ids(idx, "GPT.forward")
        B, T = idx.shape
        if T > self.config.context_length:
            raise ValueError(
                f"sequence length {T} exceeds context_length {self.config.context_length}; "
                "crop the input to the last context_length tokens"
            )
        x = self.tok_emb.forward(idx)  # (B, T, C)
        self._add_positions(x, 0, T)
        x = self.drop.forward(x)
        for block in self.blocks:
            x = self._block_forward(block, x)  # (B, T, C)
        h = self.ln_f.forward(x)  # (B, T, C)
        self._cache = h
        return self._head(h)  # (B, T, V)

    def _head(self, h):
        """h (B, T, C) -> logits (B, T, V): the tied embedding matrix, or `head`."""
        if not self.config.tie_weights:
            return self.head.forward(h)
        W = self.tok_emb.params["weight"]  # (V, C)
        return (h.reshape(-1, h.shape[-1]) @ W.T).reshape(*h.shape[:-1], -1)  # (B, T, V)

    def _add_positions(self, x, start: int, T: int) -> None:
        """x (B, T, C) += the position vectors of positions start..start+T-1 (in place;
        nothing for RoPE, which acts inside attention, or for pos="none")."""
        if self.config.pos == "learned":
            x += self.pos_emb.forward(self.xp.arange(start, start + T))  # (T, C), over the batch
        elif self.config.pos == "sinusoidal":
            x += self.buffers["pos_table"][start:start + T]  # (T, C)

    @property
    def aux_loss(self) -> float:
        """The load-balancing loss of the last forward, summed over the MoE blocks (0.0
        without experts). The training objective is loss + aux_loss; `backward` adds
        its gradient (scaled by `daux`)."""
        return sum(layer.aux_loss for layer in self.aux_layers())

    def _token_ids(self, idx, who: str):
        """idx as a (B, T) integer array on the model's device, ids checked against V."""
        if xp_of(idx) is not self.xp:  # lists, or ids on the other device
            idx = to_device(to_numpy(idx), self.xp)
        if idx.ndim != 2:
            raise ValueError(f"{who}: idx must be a (B, T) array of token ids, "
                             f"got shape {idx.shape}")
        check_ids(idx, self.config.vocab_size, who)
        return idx

    def backward(self, dlogits, daux: float = 1.0) -> None:
        """dlogits (B, T, V) -> fills every parameter's grad (accumulating).

        `daux` is the upstream gradient of `aux_loss` (MoE models only): 1.0 when
        the objective is loss + aux_loss, 1/k when accumulating k micro-batches,
        as the loss's own gradient is scaled."""
        h = self._take_cache()
        for layer in self.aux_layers():
            layer.aux_grad = daux
        C = self.config.d_model
        if self.config.tie_weights:
            W = self.tok_emb.params["weight"]  # (V, C)
            # logits = h @ W^T  =>  dh = dlogits @ W,  dW += dlogits^T @ h  (the head's share)
            V = dlogits.shape[-1]
            dlogits2 = dlogits.reshape(-1, V)  # (N, V)
            dh = (dlogits2 @ W).reshape(h.shape)  # (B, T, C)
            self.tok_emb.grads["weight"] += dlogits2.T @ h.reshape(-1, C)
        else:
            dh = self.head.backward(dlogits)  # (B, T, C)
        dx = self.ln_f.backward(dh)
        for block in reversed(self.blocks):
            dx = self._block_backward(block, dx)
        dx = self.drop.backward(dx)
        if self.config.pos == "learned":
            # x = tok_emb[idx] + pos_emb[t]: the sum forks dx to both tables; each
            # position's row collects the gradient of every sequence in the batch.
            self.pos_emb.backward(dx.sum(axis=0))  # (T, C)
        self.tok_emb.backward(dx)  # the lookup's share of the (tied) matrix gradient

    # -- activation recomputation (gradient checkpointing) ------------------------

    recompute = False  # `model.recompute = True` switches it on (training forwards only)

    def _block_forward(self, block, x):
        """x (B, T, C) -> block.forward(x). With `recompute` on, in training mode, the
        block then keeps only its input x and where its dropout streams stood; its
        activations are freed here and recomputed in `_block_backward`.

        Activation recomputation (Chen et al. 2016, "Training Deep Nets with Sublinear
        Memory Cost"): the activations of a forward, kept for backward, are most of a
        training step's memory. Keeping one (B, T, C) array per block instead, and
        running each block's forward again just before its backward, costs about one
        more forward (a third more compute) and keeps one block's activations at a time.
        """
        if not (self.recompute and self.training):
            return block.forward(x)
        streams = _dropout_streams(block)  # before the forward draws its masks
        y = block.forward(x)  # (B, T, C)
        block.clear_backward_caches()  # every activation inside the block goes...
        block._cache = (x, streams)  # ...but its input: the block's checkpoint
        return y

    def _block_backward(self, block, dout):
        """dout (B, T, C) -> dx (B, T, C), recomputing the block's forward first when
        `_block_forward` kept only its input. The recomputed forward is the same
        computation on the same input, with each dropout layer's generator put back
        where it stood, so it draws the same masks: the activations, and so the
        gradients, are bit for bit those of a run without recomputation."""
        if block._cache is None:  # a forward without recomputation: activations are there
            return block.backward(dout)
        x, streams = block._take_cache()
        for drop, state in streams:
            drop.rng.bit_generator.state = state  # replay the same masks
        block.forward(x)  # the activations again; its output is not needed
        return block.backward(dout)

    # -- inference with a KV cache ---------------------------------------------

    def forward_cached(self, idx, cache, *, all_logits: bool = False):
        """Inference: idx (B, t) are the tokens at positions cache.pos..cache.pos+t-1
        of sequences whose earlier tokens are in `cache` (a tinylm.nn.kv_cache.KVCache,
        filled by earlier calls) -> logits of the last position (B, V), or of
        every new position (B, t, V) with all_logits=True. Advances cache.pos by t.

        Gives the same logits as `forward` on the whole sequence (the rows for
        these positions) while computing only the new positions: each layer
        appends their keys/values to its cache and attends over all of them.
        Eval mode only (no dropout) and keeps nothing for backward. A rolling cache
        (`KVCache.for_model(model, B, rolling=True)`) goes on past the context, one
        token at a time; where that is exact: tinylm/nn/kv_cache.py.
        """
        if self.training:
            raise RuntimeError("forward_cached is for inference: call model.eval() first "
                               "(tinylm.generate does this for you)")
        idx = self._token_ids(idx, "GPT.forward_cached")
        B, t = idx.shape
        pos = cache.pos
        if cache.batch_size != B:
            raise ValueError(f"the KV cache holds {cache.batch_size} sequences, idx has {B}")
        if pos + t > self.config.context_length:
            if not cache.rolling:
                raise ValueError(
                    f"the KV cache holds {pos} positions and {t} more would exceed "
                    f"context_length {self.config.context_length}; reset it and prefill the "
                    "last context_length tokens (tinylm.generate does this)"
                )
            if t != 1:
                raise ValueError("past the context a rolling KV cache takes one token at a "
                                 f"time, got {t}")
            pos = self._renumber_positions(cache)
        x = self.tok_emb.forward(idx)  # (B, t, C)
        self._add_positions(x, pos, t)  # positions go on from the cache
        for layer, block in enumerate(self.blocks):
            x = block.forward_cached(x, cache, layer)  # (B, t, C)
        cache.pos = pos + t
        if not all_logits:
            # sampling needs only the last position: skip t-1 rows of the
            # (C x V) head matmul, the biggest one in a prefill
            x = x[:, -1:]  # (B, 1, C)
        h = self.ln_f.forward(x)  # (B, t', C), LayerNorm is per position
        logits = self._head(h)  # (B, t', V)
        if cache.layers is None or cache.layers[0] is not self:
            cache.layers = list(self.modules())  # listed once per cache: see KVCache.layers
        for m in cache.layers:  # what the layers' forwards kept for a backward: drop it
            m._cache = None
        return logits if all_logits else logits[:, -1]  # (B, t, V) or (B, V)

    def _renumber_positions(self, cache) -> int:
        """A full rolling cache (pos="rope" or "none"): number its held positions
        0..held-1 again, and return the new token's position, held.

        Scores see positions only through offsets q - k, so shifting every position
        down by the same s changes none of them, and positions stay inside RoPE's
        tables (which end at the context). RoPE's cached keys carry their rotation,
        so each is turned back by s positions: one rotation by the angles of position
        s, applied to all of them. Run before every token once the cache is full (s = 1)."""
        held = cache.held
        shift = cache.pos - held
        if shift:
            for layer, block in enumerate(self.blocks):
                rope = block.attn.rope
                if rope is not None:
                    cos, sin = rope.tables(shift + 1, self.xp, self.dtype)  # (n, hs) each
                    keys = cache.k[layer][:, :, :held]  # (B, Hkv, held, hs) view
                    keys[...] = apply_rope(keys, cos[shift], -sin[shift])  # angle -shift
        cache.pos = held
        return held

    # -- state --------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: NumPy copy} for every parameter (names: docs/architecture.md)."""
        return {name: to_numpy(p).copy() for name, p, _ in self.parameters()}

    def load_state_dict(self, state: dict) -> None:
        """Copy values in place; names and shapes must match exactly."""
        own = {name: p for name, p, _ in self.parameters()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the model: missing {missing}, unexpected {unexpected}"
            )
        for name, p in own.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"shape mismatch for {name}: state dict has {tuple(value.shape)}, "
                    f"model expects {tuple(p.shape)}"
                )
        for name, p in own.items():
            p[...] = to_device(to_numpy(state[name]).astype(p.dtype), self.xp)


def _dropout_streams(layer) -> list:
    """[(dropout layer, the state of its generator)] for every Dropout in `layer`: what
    it takes to draw the same masks again (each Dropout draws from its own stream)."""
    return [(m, m.rng.bit_generator.state) for m in layer.modules() if isinstance(m, Dropout)]
