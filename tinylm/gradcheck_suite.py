"""The cases behind `tinylm gradcheck`: every layer, the losses and whole models,
each built small and in float64 on the requested device (the tests run the same
cases). The checker itself is tinylm/gradcheck.py.
"""

from __future__ import annotations

import numpy as np

from tinylm.backend import get_xp, to_device
from tinylm.gradcheck import check_layer, check_model, randomize_params


def suite_cases(device: str = "cpu"):
    """(label, thunk) pairs; each thunk builds a float64 case and returns its results."""
    from tinylm.lora import LoRALinear, add_lora
    from tinylm.model import GPT, GPTConfig
    from tinylm.nn import (
        GELU,
        MLP,
        Block,
        CausalSelfAttention,
        DPOLoss,
        Dropout,
        Embedding,
        LayerNorm,
        Linear,
        Module,
        MoE,
        ReLU,
        RMSNorm,
        RotaryEmbedding,
        SequenceLogProb,
        SiLU,
        SoftmaxCrossEntropy,
        SwiGLU,
    )

    xp = get_xp(device)
    kw = dict(device=device, dtype="float64")

    def on(layer):  # the layer, moved to the suite's device in float64
        return layer.to(**kw)

    def data(shape, seed=1, scale=1.0):
        return to_device(np.random.default_rng(seed).standard_normal(shape) * scale, xp)

    def ids(shape, high, seed=2):
        return to_device(np.random.default_rng(seed).integers(0, high, size=shape), xp)

    def layer_case(layer, *inputs):
        randomize_params(layer, np.random.default_rng(3))
        return check_layer(layer, *inputs)

    def gpt_case(dropout=0.0, **cfg_kw):
        shape = dict(vocab_size=13, context_length=8, d_model=8, n_layers=2, n_heads=2)
        cfg = GPTConfig(**{**shape, **cfg_kw}, dropout=dropout)
        model = GPT(cfg, seed=0, **kw)
        randomize_params(model, np.random.default_rng(4), scale=0.2)
        targets = ids((2, 7), 13, seed=6)
        targets[0, 2] = -100  # an ignored position
        return check_model(model, ids((2, 7), 13, seed=5), targets,
                           SoftmaxCrossEntropy(label_smoothing=0.1))

    # -- fine-tuning: LoRA adapters, sequence log-probabilities, DPO --

    class DPOOnLogProbs(Module):
        """DPOLoss as a one-input layer for check_layer: x (2, B) holds the policy's
        chosen and rejected log-probs; the reference's are constants (no gradient)."""

        def __init__(self, ref, beta):
            super().__init__()
            self.loss, self.ref = DPOLoss(beta), ref  # ref (2, B)

        def forward(self, x):
            return self.loss.forward(x[0], x[1], self.ref[0], self.ref[1])

        def backward(self, dloss):
            return xp.stack(self.loss.backward(dloss))  # (2, B)

    class DPOOnLogits(Module):
        """SequenceLogProb then DPOLoss as one loss, `forward(logits, targets) -> float`,
        `backward() -> dlogits`: logits (2B, T, V) hold the chosen rows, then the rejected
        ones; the mask and the reference log-probs (2B,) are constants."""

        def __init__(self, mask, ref, beta):
            super().__init__()
            self.seq, self.dpo, self.mask, self.ref = SequenceLogProb(), DPOLoss(beta), mask, ref

        def forward(self, logits, targets):
            B = logits.shape[0] // 2
            logp = self.seq.forward(logits, targets, self.mask)  # (2B,)
            return self.dpo.forward(logp[:B], logp[B:], self.ref[:B], self.ref[B:])

        def backward(self, dloss=1.0):
            return self.seq.backward(xp.concatenate(self.dpo.backward(dloss)))  # (2B, T, V)

    def response_mask(shape, seed=8):  # (B, T) 0/1: a random "prompt" prefix is not counted
        mask = np.ones(shape)
        for row, start in enumerate(np.random.default_rng(seed).integers(0, shape[1], shape[0])):
            mask[row, :start] = 0.0
        return to_device(mask, xp)

    def lora_case(base, x, rank, alpha):
        randomize_params(base, np.random.default_rng(3))  # the frozen W and b
        return layer_case(LoRALinear(base, rank, alpha), x)  # then A and B

    def lora_gpt_case(targets, objective="ce", **cfg_kw):
        shape = dict(vocab_size=13, context_length=8, d_model=8, n_layers=2, n_heads=2)
        model = GPT(GPTConfig(**{**shape, **cfg_kw}), seed=0, **kw)
        randomize_params(model, np.random.default_rng(4), scale=0.2)
        add_lora(model, rank=2, alpha=4.0, targets=targets)
        randomize_params(model, np.random.default_rng(9), scale=0.3)  # B != 0: A gets gradient
        idx, y = ids((4, 7), 13, seed=5), ids((4, 7), 13, seed=6)
        if objective == "ce":
            y[0, 2] = -100  # an ignored position
            return check_model(model, idx, y, SoftmaxCrossEntropy())
        return check_model(model, idx, y, DPOOnLogits(response_mask((4, 7)), data(4, 11), 0.5))

    dropout_train = Dropout(0.3).train()
    ids_with_repeats = to_device(np.array([[1, 3, 1], [3, 3, 0]]), xp)  # (2, 3)
    return [
        ("Linear", lambda: layer_case(on(Linear(5, 7)), data((2, 3, 5)))),
        ("Linear(bias=False)", lambda: layer_case(on(Linear(5, 4, bias=False)), data((3, 5)))),
        ("Embedding (repeated ids)",
         lambda: layer_case(on(Embedding(6, 4)), ids_with_repeats)),
        ("LayerNorm", lambda: layer_case(on(LayerNorm(6)), data((2, 3, 6)))),
        ("GELU", lambda: layer_case(on(GELU()), data((3, 7), scale=2.0))),
        ("Dropout(0.3), fixed mask", lambda: layer_case(dropout_train, data((4, 5)))),
        ("CausalSelfAttention",
         lambda: layer_case(on(CausalSelfAttention(8, 2)), data((2, 5, 8)))),
        ("CausalSelfAttention(dropout)",
         lambda: layer_case(on(CausalSelfAttention(8, 2, dropout=0.2)), data((2, 4, 8)))),
        ("MLP", lambda: layer_case(on(MLP(6)), data((2, 3, 6)))),
        ("Block", lambda: layer_case(on(Block(8, 2)), data((2, 4, 8)))),
        ("SoftmaxCrossEntropy(smoothing, ignore)", lambda: _loss_case(xp)),
        ("GPT (tied, bias)", lambda: gpt_case()),
        ("GPT (untied, no bias)", lambda: gpt_case(bias=False, tie_weights=False)),
        ("GPT (dropout 0.1, train)", lambda: gpt_case(dropout=0.1)),
        # -- the modern variants (GPTConfig switches) --
        ("RMSNorm", lambda: layer_case(on(RMSNorm(6)), data((2, 3, 6)))),
        ("ReLU", lambda: layer_case(on(ReLU()), data((3, 7)))),
        ("SiLU", lambda: layer_case(on(SiLU()), data((3, 7), scale=2.0))),
        ("SwiGLU", lambda: layer_case(on(SwiGLU(6, 10)), data((2, 3, 6)))),
        ("RotaryEmbedding", lambda: layer_case(on(RotaryEmbedding(6, 8)), data((2, 2, 5, 6)))),
        ("CausalSelfAttention(GQA, RoPE)",
         lambda: layer_case(on(CausalSelfAttention(8, 4, n_kv_heads=2, rope_theta=100.0,
                                                   max_positions=8)), data((2, 5, 8)))),
        ("CausalSelfAttention(MQA, window 2, dropout)",
         lambda: layer_case(on(CausalSelfAttention(8, 2, n_kv_heads=1, sliding_window=2,
                                                   dropout=0.2)), data((2, 5, 8)))),
        # flash attention (tinylm/nn/flash.py): tiles that do not divide T, so the
        # partial last tiles, the skipped ones and the masked diagonal are all checked
        ("CausalSelfAttention(flash, tiles 2x3)",
         lambda: layer_case(on(CausalSelfAttention(8, 2, attention="flash", block_q=2,
                                                   block_k=3)), data((2, 5, 8)))),
        ("CausalSelfAttention(flash, GQA, RoPE, W=2)",
         lambda: layer_case(on(CausalSelfAttention(8, 4, n_kv_heads=2, rope_theta=100.0,
                                                   max_positions=8, sliding_window=2,
                                                   attention="flash", block_q=2, block_k=2)),
                            data((2, 5, 8)))),
        ("MoE(4 experts, top-2, aux loss)",
         lambda: layer_case(on(MoE(6, 4, 2, aux_loss_coef=0.5)), data((2, 5, 6)))),
        ("MoE(3 SwiGLU experts, top-1)",
         lambda: layer_case(on(MoE(6, 3, 1, kind="swiglu", hidden=8, aux_loss_coef=0.5)),
                            data((2, 4, 6)))),
        ("Block(post-norm, RMSNorm, ReLU)",
         lambda: layer_case(on(Block(8, 2, norm="rmsnorm", norm_placement="post",
                                     mlp="relu")), data((2, 4, 8)))),
        ("GPT (Llama: RoPE, RMSNorm, SwiGLU, GQA)",
         lambda: gpt_case(pos="rope", norm="rmsnorm", mlp="swiglu", n_heads=4, n_kv_heads=2,
                          bias=False, tie_weights=False)),
        ("GPT (sinusoidal, post-norm, ReLU)",
         lambda: gpt_case(pos="sinusoidal", norm_placement="post", mlp="relu")),
        ("GPT (no positions, MQA, sliding window 3)",
         lambda: gpt_case(pos="none", n_kv_heads=1, sliding_window=3)),
        ("GPT (flash attention, GQA, RoPE, window 3)",
         lambda: gpt_case(pos="rope", n_heads=4, n_kv_heads=2, sliding_window=3,
                          attention="flash")),
        ("GPT (MoE: 4 SwiGLU experts, top-2, RoPE)",
         lambda: gpt_case(pos="rope", norm="rmsnorm", mlp="swiglu", n_experts=4,
                          experts_per_token=2, moe_aux_loss_coef=0.1, bias=False)),
        # -- fine-tuning (tinylm/lora.py, tinylm/nn/preference.py); no "linear" in the
        # names, so that --only Linear still selects the two Linear cases --
        ("LoRA layer (rank 3)",
         lambda: lora_case(on(Linear(5, 7)), data((2, 3, 5)), 3, 6.0)),
        ("LoRA layer (no bias, rank 1)",
         lambda: lora_case(on(Linear(6, 4, bias=False)), data((5, 6)), 1, 16.0)),
        ("SequenceLogProb(prompt masked)",
         lambda: check_layer(SequenceLogProb(), data((3, 5, 6), scale=2.0),
                             ids((3, 5), 6, seed=7), response_mask((3, 5)))),
        ("DPOLoss(beta 0.5)",
         lambda: check_layer(DPOOnLogProbs(data((2, 5), seed=12, scale=3.0), 0.5),
                             data((2, 5), seed=13, scale=3.0))),
        ("SequenceLogProb + DPOLoss (logits)",
         lambda: check_layer(DPOOnLogits(response_mask((4, 5)), data(4, 11), 0.5),
                             data((4, 5, 6), scale=2.0), ids((4, 5), 6, seed=7))),
        ("GPT + LoRA (qkv, proj)", lambda: lora_gpt_case(("attn.qkv", "attn.proj"))),
        ("GPT (Llama) + LoRA (every block matrix), DPO",
         lambda: lora_gpt_case("all-linear", "dpo", pos="rope", norm="rmsnorm", mlp="swiglu",
                               n_heads=4, n_kv_heads=2, bias=False, tie_weights=False)),
    ]


def _loss_case(xp):
    from tinylm.nn import SoftmaxCrossEntropy

    rng = np.random.default_rng(7)
    logits = to_device(rng.standard_normal((2, 3, 5)) * 2.0, xp)
    targets = to_device(np.array([[0, 4, -100], [2, -100, 1]]), xp)
    return check_layer(SoftmaxCrossEntropy(label_smoothing=0.2), logits, targets)
