"""The presets: named TrainConfigs, each a published recipe or a variant of one.

    from tinylm.train import PRESETS
    config = PRESETS["shakespeare-char-llama"].replace(max_iters=500)
"""

from __future__ import annotations

from tinylm.training.config import TrainConfig

DEFAULT_PRESET = "shakespeare-char-cpu"

PRESETS: dict[str, TrainConfig] = {
    # nanoGPT's CPU recipe (its README): ~1.88 validation loss in a few minutes.
    "shakespeare-char-cpu": TrainConfig(),
    # nanoGPT's "baby GPT" (config/train_shakespeare_char.py), 10.7M parameters: for a GPU.
    "shakespeare-char": TrainConfig(
        context_length=256, d_model=384, n_layers=6, n_heads=6, dropout=0.2, batch_size=64,
        max_iters=5000, eval_iters=200, log_interval=10, device="auto",
        out_dir="runs/shakespeare-char"),
    # The CPU recipe with a small byte-level BPE (512 ids, trained in about a second).
    "shakespeare-bpe": TrainConfig(tokenizer="bpe", vocab_size=512, out_dir="runs/shakespeare-bpe"),
    # The CPU recipe as a Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention (2 kv heads
    # for 4 query heads), no biases, an untied head.
    "shakespeare-char-llama": TrainConfig(
        pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False, tie_weights=False,
        out_dir="runs/shakespeare-char-llama"),
    # The Llama recipe with Mistral's sliding window and a Mixtral-style MoE: 4 SwiGLU
    # experts of about half the dense width (176 vs 344), 2 per token: about the dense
    # model's compute per token, with twice its MLP parameters.
    "shakespeare-char-moe": TrainConfig(
        pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False, tie_weights=False,
        sliding_window=32, n_experts=4, experts_per_token=2, mlp_hidden=176,
        out_dir="runs/shakespeare-char-moe"),
}

PRESET_HELP = {
    "shakespeare-char-cpu": "char-level, 4x128 model, context 64, 2000 steps: minutes on a CPU",
    "shakespeare-char": "char-level, nanoGPT's 6x384 baby GPT, context 256, 5000 steps: a GPU",
    "shakespeare-bpe": "as shakespeare-char-cpu with a 512-id BPE tokenizer trained on the fly",
    "shakespeare-char-llama": "as shakespeare-char-cpu, Llama-style: RoPE, RMSNorm, SwiGLU, GQA",
    "shakespeare-char-moe": "the Llama recipe with a sliding window of 32 and 4 experts, top-2",
}
