"""Write tests/fixtures/hf_gpt2/: a tiny random GPT-2 saved by Hugging Face `transformers`,
and its logits, for tests/test_interop.py. Run by hand (the tests need neither PyTorch
nor transformers):

    pip install torch==2.13.0 transformers safetensors tokenizers   # CPU build is enough
    python scripts/make_hf_gpt2_fixture.py

What it writes (about 260 kB):

    config.json, model.safetensors   GPT2LMHeadModel.save_pretrained of a tiny GPT-2
                                     (n_positions 32, n_embd 32, 2 layers, 4 heads) whose
                                     weights are redrawn from a seeded generator with
                                     large spreads, so that every tensor moves the logits
    generation_config.json           also written by save_pretrained (ignored by tinylm)
    vocab.json, merges.txt           a small byte-level BPE in GPT-2's format, trained
                                     here with `tokenizers` on Tiny Shakespeare
    expected.npz                     idx (2, 32) and idx_short (1, 7) int64 token ids;
                                     logits / logits_short: transformers' float32 logits;
                                     logits_short64: the short ones in float64;
                                     text, text_ids: a sentence and the tokenizer's ids

Then, the reverse direction (printed, not written): a random tinylm GPT, tied and untied,
is exported with `tinylm.interop.to_hf_gpt2`, loaded with
`GPT2LMHeadModel.from_pretrained`, and its logits are compared with tinylm's, in float32
and float64. The safetensors files are also cross-read with the `safetensors` package.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tinylm import GPT, GPTConfig  # noqa: E402
from tinylm.interop import from_hf_gpt2, load_file, to_hf_gpt2  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "hf_gpt2"
CORPUS = ROOT / "tinylm" / "data" / "tinyshakespeare.txt"
SPECIAL = "<|endoftext|>"
VOCAB_SIZE = 320  # 1 special + 256 bytes + 63 merges
SHAPE = dict(n_positions=32, n_embd=32, n_layer=2, n_head=4)
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."
SEED = 1234


def train_tokenizer(out: Path):
    """A GPT-2-style byte-level BPE (GPT-2's pre-split regex, no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[SPECIAL],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")[:100_000]], trainer=trainer)
    tok.model.save(str(out))  # vocab.json, merges.txt
    return tok


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter with spreads large enough that a wrong layout or a
    missing term changes the logits by far more than rounding (GPT-2's own init,
    std 0.02 and unit LayerNorms, would hide a swapped LayerNorm weight and bias)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            value = (1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif "wte" in name or "wpe" in name:
            value = 0.5 * noise
        else:
            value = 0.3 * noise
        p.copy_(value.to(p.dtype))


def hf_logits(model: GPT2LMHeadModel, idx: np.ndarray, dtype) -> np.ndarray:
    model = model.to(dtype)
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


def make_fixture() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(OUT)
    eot = tok.token_to_id(SPECIAL)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot,
                        **SHAPE)
    config._attn_implementation = "eager"  # the plain softmax(q k^T / sqrt(hs)) v path
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config).eval()
    randomize(model, SEED)
    model.save_pretrained(OUT)  # transformers >= 5 writes safetensors only

    rng = np.random.default_rng(SEED)
    text_ids = np.array(tok.encode(TEXT).ids, dtype=np.int64)
    n = SHAPE["n_positions"]
    idx = np.stack([np.resize(text_ids, n), rng.integers(0, config.vocab_size, n)])  # (2, 32)
    idx_short = rng.integers(0, config.vocab_size, (1, 7))  # (1, 7)
    expected = dict(idx=idx, idx_short=idx_short, text=np.array(TEXT), text_ids=text_ids)
    expected["logits"] = hf_logits(model, idx, torch.float32)  # (2, 32, V)
    expected["logits_short"] = hf_logits(model, idx_short, torch.float32)  # (1, 7, V)
    expected["logits_short64"] = hf_logits(model, idx_short, torch.float64)  # (1, 7, V)
    np.savez(OUT / "expected.npz", **expected)

    meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    print(f"wrote {OUT} ({sum(p.stat().st_size for p in OUT.iterdir()) / 1e3:.0f} kB), {meta}")

    # cross-check: tinylm's reader against the safetensors package
    from safetensors.numpy import load_file as st_load

    theirs, ours = st_load(OUT / "model.safetensors"), load_file(OUT / "model.safetensors")
    same = theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)
    print(f"tinylm's safetensors reader == safetensors.numpy.load_file: {same}")

    tl = from_hf_gpt2(OUT)
    err = np.abs(tl.forward(idx) - expected["logits"]).max()
    print(f"forward: tinylm.from_hf_gpt2 vs transformers, float32: max abs diff {err:.2e}")


def reverse(tie_weights: bool) -> None:
    """tinylm -> to_hf_gpt2 -> GPT2LMHeadModel.from_pretrained: same logits?"""
    cfg = GPTConfig(vocab_size=300, context_length=32, d_model=32, n_layers=2, n_heads=4,
                    tie_weights=tie_weights)
    model = GPT(cfg, seed=7)
    rng = np.random.default_rng(7)
    model.load_state_dict({k: v + 0.2 * rng.standard_normal(v.shape).astype(v.dtype)
                           for k, v in model.state_dict().items()})  # move every weight
    model.eval()
    idx = rng.integers(0, cfg.vocab_size, (2, 32))
    with tempfile.TemporaryDirectory() as tmp:
        to_hf_gpt2(model, tmp, eos_token_id=0)
        from safetensors import safe_open

        with safe_open(f"{tmp}/model.safetensors", framework="np") as f:
            names = sorted(f.keys())
            readable = all(f.get_tensor(k).dtype == np.float32 for k in names)
        hf = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="eager").eval()
        for dtype, tdtype in (("float32", torch.float32), ("float64", torch.float64)):
            ours = GPT(cfg, dtype=dtype)
            ours.load_state_dict(model.state_dict())
            ours.eval()
            mine = ours.forward(idx)
            theirs = hf_logits(hf, idx, tdtype)
            diff = np.abs(mine - theirs)
            rel = diff.max() / np.abs(theirs).max()
            print(f"reverse ({'tied' if tie_weights else 'untied'}, {dtype}): tinylm export -> "
                  f"transformers logits: max abs diff {diff.max():.2e}, relative {rel:.2e}; "
                  f"allclose(rtol=1e-5, atol=1e-5): "
                  f"{np.allclose(mine, theirs, rtol=1e-5, atol=1e-5)}")
        keys = sorted(json.loads(Path(tmp, "config.json").read_text()))
        print(f"  exported {len(names)} tensors, safetensors.safe_open reads them as float32: "
              f"{readable}; config keys: {keys}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    make_fixture()
    reverse(tie_weights=True)
    reverse(tie_weights=False)
