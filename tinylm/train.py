"""Training: the configuration, the presets, the `Trainer`, and the `tinylm train` command.

    from tinylm.train import PRESETS, Trainer
    config = PRESETS["shakespeare-char-cpu"].replace(max_iters=200, out_dir="runs/demo")
    result = Trainer(config).train()          # {"val_loss": ..., "val_ppl": ..., ...}

One optimizer step (`Trainer.train_step`), with k = grad_accum_steps micro-batches:

    lr = cosine_schedule(step)                          warmup, then cosine to min_lr
    zero grads
    k times:  x, y = random windows;  loss = CE(model(x), y)
              backward(loss / k)                        grads add up (+=) to the mean
    clip_grad_norm(grad_clip);  AdamW step

Every eval_interval steps (and at the end) the mean loss over eval_iters random
batches of each split is measured, as nanoGPT's `estimate_loss`, so numbers are
comparable with its published ones; the run directory then gets

    out_dir/last/      checkpoint to resume from (see tinylm/checkpoint.py)
    out_dir/best/      checkpoint with the lowest validation loss so far
    out_dir/log.jsonl  one JSON record per step / evaluation
    out_dir/loss.png   train and validation loss curves
    out_dir/tokens.npy the tokenized text (memory-mapped; see tinylm/data.py)

Resuming restores everything a step depends on (weights, AdamW moments and step
count, the batch sampler's and every dropout layer's random generator, the eval
generator), so on the CPU a resumed run ends with bitwise the same weights as an
uninterrupted one. The sections below: configuration, presets, trainer, plot, command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinylm import checkpoint
from tinylm.backend import DEVICES, resolve_device, to_device, to_numpy
from tinylm.data import Batches, get_batch, prepare
from tinylm.model import GPT, GPTConfig
from tinylm.nn import Dropout, SoftmaxCrossEntropy
from tinylm.optim import AdamW, clip_grad_norm, cosine_schedule

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _opt(default, help_text: str):
    """A TrainConfig field; its help text is its comment and appears in `--help`."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. The defaults are the shakespeare-char-cpu
    preset (nanoGPT's CPU recipe for Tiny Shakespeare)."""

    # -- data --
    data: str | None = _opt(None, "UTF-8 text file to train on; null: the bundled Tiny Shakespeare")
    tokenizer: str = _opt("char", "'char' (one id per character), 'bpe' (byte-level BPE trained "
                                  "on the data) or the path of a tokenizer JSON file")
    vocab_size: int = _opt(512, "ids of the BPE tokenizer trained when tokenizer='bpe' "
                                "(256 bytes + merges)")
    tokenizer_train_chars: int = _opt(2_000_000, "tokenizer='bpe' learns its merges from at most "
                                                 "this many leading characters of the data")
    val_fraction: float = _opt(0.1, "the last val_fraction of the tokens is the validation split")
    # -- model (GPTConfig; vocab_size comes from the tokenizer) --
    context_length: int = _opt(64, "T: tokens the model sees at once")
    d_model: int = _opt(128, "C: width of the residual stream")
    n_layers: int = _opt(4, "transformer blocks")
    n_heads: int = _opt(4, "attention heads per block (must divide d_model)")
    dropout: float = _opt(0.0, "dropout probability while training (embeddings, attention, "
                               "residual branches)")
    bias: bool = _opt(False, "biases in Linear and LayerNorm layers (nanoGPT's recipes: false)")
    tie_weights: bool = _opt(True, "the output head shares the token-embedding matrix")
    pos: str = _opt("learned", "positions: learned, sinusoidal, rope or none")
    rope_theta: float = _opt(10000.0, "RoPE base (with pos=rope)")
    norm: str = _opt("layernorm", "layernorm or rmsnorm")
    norm_eps: float = _opt(1e-5, "epsilon of every norm layer")
    norm_placement: str = _opt("pre", "pre (GPT-2) or post (the original Transformer)")
    mlp: str = _opt("gelu", "gelu, relu or swiglu")
    mlp_hidden: int | None = _opt(None, "MLP width; null: 4 d_model (8/3 d_model for swiglu)")
    n_kv_heads: int | None = _opt(None, "key/value heads (grouped-query attention; 1: "
                                        "multi-query); null: n_heads")
    sliding_window: int | None = _opt(None, "attend to the last this many positions only; "
                                            "null: the whole context")
    n_experts: int = _opt(0, "> 0: mixture-of-experts MLPs with this many experts")
    experts_per_token: int = _opt(2, "experts each token is routed to (with n_experts > 0)")
    moe_aux_loss_coef: float = _opt(0.01, "weight of the MoE load-balancing loss")
    dtype: str = _opt("float32", "parameter and activation dtype: float32 or float64")
    # -- optimisation --
    batch_size: int = _opt(12, "B: sequences per micro-batch")
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step (the step sees "
                                    "batch_size * grad_accum_steps sequences)")
    max_iters: int = _opt(2000, "optimizer steps to train for")
    lr: float = _opt(1e-3, "peak learning rate (reached after warmup)")
    min_lr: float = _opt(1e-4, "learning rate at the end of the cosine decay (set = lr for "
                               "a constant rate)")
    warmup_iters: int = _opt(100, "steps of linear warmup from ~0 to lr")
    lr_decay_iters: int | None = _opt(None, "step where the cosine decay reaches min_lr; "
                                            "null: max_iters")
    beta1: float = _opt(0.9, "AdamW beta1 (first-moment decay)")
    beta2: float = _opt(0.99, "AdamW beta2 (second-moment decay; 0.99 suits small batches)")
    eps: float = _opt(1e-8, "AdamW epsilon")
    weight_decay: float = _opt(0.1, "AdamW decoupled weight decay (matrices and embeddings only)")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this; 0 disables clipping")
    # -- evaluation, logging, run --
    eval_interval: int = _opt(250, "evaluate (and save checkpoints) every this many steps")
    eval_iters: int = _opt(20, "random batches per split in each evaluation")
    log_interval: int = _opt(1, "write a step record to log.jsonl every this many steps")
    seed: int = _opt(1337, "seeds the weights, the batch sampler, dropout and evaluation")
    device: str = _opt("cpu", "cpu, cuda (CuPy) or auto (cuda when usable)")
    out_dir: str = _opt("runs/shakespeare-char-cpu", "run directory: checkpoints, log, plot, "
                                                     "token cache")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            self._check_type(f)
        positive = ("vocab_size", "tokenizer_train_chars", "batch_size", "grad_accum_steps",
                    "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("beta1", "beta2", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.lr > 0 or not self.eps > 0:
            raise ValueError(f"TrainConfig.lr and eps must be > 0, got {self.lr}, {self.eps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.weight_decay and grad_clip must be >= 0, got "
                             f"{self.weight_decay}, {self.grad_clip}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < self.warmup_iters:
            raise ValueError(f"TrainConfig.lr_decay_iters ({self.lr_decay_iters}) must be >= "
                             f"warmup_iters ({self.warmup_iters})")
        if self.tokenizer == "bpe" and self.vocab_size < 256:
            raise ValueError(f"TrainConfig.vocab_size must be >= 256 for a BPE tokenizer "
                             f"(the bytes), got {self.vocab_size}")
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"TrainConfig.dtype must be float32 or float64, got {self.dtype!r}")
        if not self.tokenizer or not self.out_dir:
            raise ValueError("TrainConfig.tokenizer and out_dir must not be empty")
        try:
            self.gpt_config(vocab_size=1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid model shape: {exc}") from None

    def _check_type(self, f) -> None:
        base, optional = _field_type(f)
        value = getattr(self, f.name)
        if value is None and optional:
            return
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(self, f.name, float(value))  # 1 means 1.0
            return
        ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
        if not ok:
            kind = base.__name__ + (" or null" if optional else "")
            raise TypeError(f"TrainConfig.{f.name} must be {kind}, got {value!r}")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model this run trains, for a tokenizer with `vocab_size` ids."""
        return GPTConfig(vocab_size=vocab_size, context_length=self.context_length,
                         d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                         dropout=self.dropout, bias=self.bias, tie_weights=self.tie_weights,
                         **{name: getattr(self, name) for name in MODEL_VARIANT_FIELDS})

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed; unknown names are an error listing valid ones."""
        check_field_names(changes, "overrides")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """From a dict (a JSON file); unknown keys are an error naming `source`."""
        check_field_names(d, source)
        return cls(**d)


# The GPTConfig variant switches a TrainConfig passes through unchanged.
MODEL_VARIANT_FIELDS = ("pos", "rope_theta", "norm", "norm_eps", "norm_placement", "mlp",
                        "mlp_hidden", "n_kv_heads", "sliding_window", "n_experts",
                        "experts_per_token", "moe_aux_loss_coef")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def check_field_names(d: dict, source: str) -> None:
    unknown = sorted(set(d) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown TrainConfig field{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)} in {source}; "
                         f"valid fields: {', '.join(field_names())}")


def _field_type(f) -> tuple[type, bool]:
    """(base type, accepts None) from an annotation such as "int | None"."""
    text = f.type if isinstance(f.type, str) else f.type.__name__
    optional = text.replace(" ", "").endswith("|None")
    base = {"int": int, "float": float, "str": str, "bool": bool}[text.split("|")[0].strip()]
    return base, optional


def parse_field_value(name: str, text: str):
    """A --set value, typed by the field: "3" -> 3, "1e-3" -> 0.001, "true", "null"."""
    check_field_names({name: None}, "--set")
    base, optional = _field_type(next(f for f in dataclasses.fields(TrainConfig) if f.name == name))
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            words = {"true": True, "1": True, "yes": True, "on": True,
                     "false": False, "0": False, "no": False, "off": False}
            return words[text.lower()]
        return base(text)
    except (KeyError, ValueError):
        kind = "true or false" if base is bool else f"a {base.__name__}"
        raise ValueError(f"--set {name}={text}: {name} must be {kind}") from None


def config_overrides_from_json(path) -> dict:
    """The fields of a JSON config file (a JSON object: {"lr": 3e-4, ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a config file holds a JSON object of TrainConfig fields")
    return d


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------

TRAINER_FORMAT = "tinylm-trainer"
TRAINER_VERSION = 1

# Fields a resumed run cannot change: they fix the model's shape or its tokens.
RESUME_FIXED = ("tokenizer", "vocab_size", "tokenizer_train_chars", "val_fraction",
                "context_length", "d_model", "n_layers", "n_heads", "dropout", "bias",
                "tie_weights", "dtype", *MODEL_VARIANT_FIELDS)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing was saved after it."""


class Trainer:
    """Trains a GPT as `config` says. Library code: it prints nothing.

    `reporter(event, info)` is told what happens (the command line prints it):
      "data"         {"message"}: tokenizer training, tokenization
      "start"        {"step", "max_iters", "params", "device", "train_tokens", "val_tokens",
                      "tokenizer", "resumed_from"}
      "step"         {"step", "loss", "lr", "grad_norm", "tokens_per_s", "dt"} after each step
                     (and "aux_loss", the load-balancing loss, for MoE models)
      "eval"         {"step", "train_loss", "val_loss", "val_ppl", "best"}
      "checkpoint"   {"path", "step", "kind"} ("last" or "best")
      "interrupted"  {"step", "path"} (path None when no checkpoint could be written)
      "end"          the dict `train()` returns
    A reporter may raise KeyboardInterrupt to stop the run as Ctrl-C does.

    `resume`: a checkpoint (directory or `checkpoint.Checkpoint`) written by a
    Trainer; the run continues from it. Otherwise an existing checkpoint in
    out_dir is an error unless `overwrite=True`.
    """

    def __init__(self, config: TrainConfig, *, reporter=None, resume=None,
                 overwrite: bool = False):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.report = reporter or (lambda event, info: None)
        self.out_dir = Path(cfg.out_dir)
        self.last_dir, self.best_dir = self.out_dir / "last", self.out_dir / "best"
        self.log_path, self.plot_path = self.out_dir / "log.jsonl", self.out_dir / "loss.png"
        self.device = resolve_device(cfg.device)

        ckpt = None
        if resume is not None:
            ckpt = resume if isinstance(resume, checkpoint.Checkpoint) else \
                checkpoint.load(resume, device=self.device)
            _check_resumable(cfg, ckpt)
        elif not overwrite and checkpoint.is_checkpoint(self.last_dir):
            state = checkpoint.read_trainer_state(self.last_dir) or {}
            raise ValueError(
                f"{self.out_dir} already holds a run (checkpoint at step {state.get('step', '?')}"
                f"); resume it, overwrite it, or choose another out_dir "
                "(tinylm train: --resume, --overwrite, --out DIR)")
        self.resumed_from = None if ckpt is None else str(ckpt.path)

        self.data = prepare(
            cfg.data, ckpt.tokenizer if ckpt is not None else cfg.tokenizer, self.out_dir,
            vocab_size=cfg.vocab_size, train_chars=cfg.tokenizer_train_chars,
            val_fraction=cfg.val_fraction, min_tokens=cfg.context_length + 1,
            report=lambda message: self.report("data", {"message": message}))
        self.tokenizer = self.data.tokenizer
        if ckpt is not None:
            self.model = ckpt.model
        else:
            self.model = GPT(cfg.gpt_config(self.tokenizer.vocab_size), seed=cfg.seed,
                             device=self.device, dtype=cfg.dtype)
        self.model.train()
        self.loss_fn = SoftmaxCrossEntropy()
        self.optimizer = AdamW(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               eps=cfg.eps, weight_decay=cfg.weight_decay)
        # Separate generators: evaluation never shifts the training batches.
        self.batches = Batches(self.data.train, cfg.context_length, cfg.batch_size,
                               seed=[cfg.seed, 1])
        self.eval_rng = np.random.default_rng([cfg.seed, 2])
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.last_eval: dict | None = None  # {"step", "train_loss", "val_loss", "val_ppl"}
        self.elapsed_s = 0.0  # wall time spent in train() (evaluations included), all sessions
        self._clock = None  # (perf_counter at the start of this train() call, elapsed_s then)
        self.last_saved_step: int | None = None
        if ckpt is not None:
            self._restore(ckpt)
            self.last_saved_step = self.step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start_log()
        self._snapshot = self.trainer_state()  # the state of the last step boundary
        self._updating = False  # True while weights and AdamW state are being changed

    # -- state ------------------------------------------------------------------------

    def dropout_layers(self) -> list[Dropout]:
        return [m for m in self.model.modules() if isinstance(m, Dropout)]

    def trainer_state(self) -> dict:
        """What trainer.json holds: enough, with the weights and AdamW, to continue exactly."""
        return {
            "format": TRAINER_FORMAT, "version": TRAINER_VERSION,
            "step": self.step, "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss, "last_eval": self.last_eval,
            "elapsed_s": self._elapsed(),
            "config": self.config.to_dict(), "data": self.data.describe(),
            "rng": {
                "batches": self.batches.state_dict()["rng"],
                "eval": self.eval_rng.bit_generator.state,
                "dropout": [d.rng.bit_generator.state for d in self.dropout_layers()],
            },
        }

    def _restore(self, ckpt) -> None:
        state, where = ckpt.trainer_state, ckpt.path / "trainer.json"
        if ckpt.optimizer_state is None or state is None:
            raise ValueError(f"{ckpt.path}: cannot resume: the checkpoint has no optimizer.npz "
                             "or trainer.json (it holds weights only)")
        if state.get("format") != TRAINER_FORMAT or state.get("version") != TRAINER_VERSION:
            raise ValueError(f"{where}: not a version-{TRAINER_VERSION} tinylm trainer state")
        try:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            cfg = self.config  # the hyper-parameters given now win over the saved ones
            self.optimizer.betas, self.optimizer.eps = (cfg.beta1, cfg.beta2), cfg.eps
            self.optimizer.weight_decay = cfg.weight_decay
            self.step = int(state["step"])
            self.tokens_seen = int(state["tokens_seen"])
            self.best_val_loss = state["best_val_loss"]
            self.last_eval = state["last_eval"]
            self.elapsed_s = float(state["elapsed_s"])
            rng = state["rng"]
            self.batches.load_state_dict({"rng": rng["batches"]})
            self.eval_rng.bit_generator.state = rng["eval"]
            drops = self.dropout_layers()
            if len(rng["dropout"]) != len(drops):
                raise ValueError(f"{len(rng['dropout'])} dropout generators for "
                                 f"{len(drops)} layers")
            for layer, s in zip(drops, rng["dropout"], strict=True):
                layer.rng.bit_generator.state = s
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: damaged trainer state ({type(exc).__name__}: {exc})") \
                from None

    def _elapsed(self) -> float:
        if self._clock is None:
            return self.elapsed_s
        started, before = self._clock
        return before + time.perf_counter() - started

    def save(self, directory, trainer_state: dict | None = None) -> Path:
        """Write a full checkpoint (weights, tokenizer, AdamW, trainer state) to `directory`."""
        state = self.trainer_state() if trainer_state is None else trainer_state
        path = checkpoint.save(directory, self.model, self.optimizer, self.tokenizer, state)
        self.last_saved_step = state["step"]
        return path

    # -- steps ------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        cfg = self.config
        decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
        return cosine_schedule(step, max_lr=cfg.lr, min_lr=cfg.min_lr,
                               warmup_steps=cfg.warmup_iters,
                               decay_steps=max(decay, cfg.warmup_iters))

    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns its numbers."""
        cfg, xp = self.config, self.model.xp
        t0 = time.perf_counter()
        lr = self.lr_at(self.step)
        self.optimizer.lr = lr
        self.model.zero_grad()
        k = cfg.grad_accum_steps
        loss_sum = aux_sum = 0.0
        for _ in range(k):
            x, y = self.batches.next()  # (B, T) each, on the host
            logits = self.model.forward(to_device(x, xp))  # (B, T, V)
            loss = self.loss_fn.forward(logits, to_device(y, xp))
            if not math.isfinite(loss):
                raise self._diverged(f"the loss is {loss}", lr)
            # Each micro-batch's loss is a mean over its B*T tokens; scaling its gradient
            # by 1/k makes the accumulated (+=) gradients the mean over all k*B*T tokens:
            # exactly the gradient of one batch k times larger. A MoE model optimises
            # loss + aux_loss (load balancing), whose gradient is scaled the same way;
            # the loss reported is the cross-entropy alone, comparable across variants.
            self.model.backward(self.loss_fn.backward(1.0 / k), daux=1.0 / k)
            loss_sum += loss
            aux_sum += self.model.aux_loss
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure, never scale
        norm = clip_grad_norm(self.model.parameters(), max_norm)
        if not math.isfinite(norm):
            raise self._diverged(f"the gradient norm is {norm}", lr)
        self._updating = True  # an interrupt from here to the snapshot cannot be saved
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += k * cfg.batch_size * cfg.context_length
        dt = time.perf_counter() - t0
        self._snapshot = self.trainer_state()
        self._updating = False
        record = {"step": self.step, "loss": loss_sum / k, "lr": lr, "grad_norm": norm,
                  "tokens_per_s": k * cfg.batch_size * cfg.context_length / dt, "dt": dt}
        if cfg.n_experts > 0:
            record["aux_loss"] = aux_sum / k
        return record

    def _diverged(self, what: str, lr: float, step: int | None = None) -> TrainingDiverged:
        """The error for a non-finite number at `step` (default: the step being taken)."""
        step = self.step + 1 if step is None else step
        where = (f"the last good checkpoint, {self.last_dir} (step {self.last_saved_step}), "
                 "is kept" if self.last_saved_step is not None else "no checkpoint was saved")
        message = (f"{what} at step {step} (lr {lr:.3g}): training stopped and "
                   f"{where}; lower lr, raise warmup_iters or set grad_clip, then resume")
        self._log({"event": "diverged", "step": step, "message": message})
        return TrainingDiverged(message)

    def evaluate(self) -> dict:
        """Mean loss over eval_iters random batches of each split (nanoGPT's estimate_loss)."""
        cfg, xp = self.config, self.model.xp
        means = {}
        self.model.eval()  # dropout off
        try:
            for split, tokens in (("train", self.data.train), ("val", self.data.val)):
                losses = []
                for _ in range(cfg.eval_iters):
                    x, y = get_batch(tokens, cfg.context_length, cfg.batch_size, self.eval_rng)
                    logits = self.model.forward(to_device(x, xp))
                    losses.append(self.loss_fn.forward(logits, to_device(y, xp)))
                means[split] = float(np.mean(losses))
        finally:
            self.model.train()
        val = means["val"]
        return {"step": self.step, "train_loss": means["train"], "val_loss": val,
                "val_ppl": math.exp(val) if val < 700 else math.inf}

    # -- the loop ---------------------------------------------------------------------

    def train(self) -> dict:
        """Train to max_iters (evaluating, saving, logging); returns the final numbers.

        Ctrl-C (or a KeyboardInterrupt from the reporter) saves out_dir/last at the
        last completed step and re-raises. A non-finite loss raises TrainingDiverged.
        """
        cfg = self.config
        self._clock = (time.perf_counter(), self.elapsed_s)
        self.report("start", {
            "step": self.step, "max_iters": cfg.max_iters,
            "params": self.model.num_parameters(), "device": self.device,
            "train_tokens": len(self.data.train), "val_tokens": len(self.data.val),
            "tokenizer": repr(self.tokenizer), "resumed_from": self.resumed_from,
        })
        self._log({"event": "start", "step": self.step, "resumed_from": self.resumed_from,
                   "config": cfg.to_dict()})
        try:
            with _DeferredInterrupt() as ctrl_c:
                while True:
                    if self._eval_due():
                        self._evaluate_and_save()
                    if ctrl_c.requested:
                        raise KeyboardInterrupt
                    if self.step >= cfg.max_iters:
                        break
                    info = self.train_step()
                    if self.step % cfg.log_interval == 0:
                        self._log({"event": "step", **info, "time_s": self._elapsed()})
                    self.report("step", info)
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        finally:
            self.elapsed_s, self._clock = self._elapsed(), None
        result = self.result()
        self.report("end", result)
        return result

    def result(self) -> dict:
        last = self.last_eval or {}
        best = self.best_val_loss
        return {
            "step": self.step, "train_loss": last.get("train_loss"),
            "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),
            "best_val_loss": best, "best_val_ppl": None if best is None else math.exp(best),
            "elapsed_s": self.elapsed_s, "tokens_seen": self.tokens_seen,
            "last_checkpoint": str(self.last_dir), "best_checkpoint": str(self.best_dir),
            "log": str(self.log_path), "plot": str(self.plot_path),
        }

    def _eval_due(self) -> bool:
        cfg = self.config
        due = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
        return due and (self.last_eval or {}).get("step") != self.step

    def _evaluate_and_save(self) -> None:
        ev = self.evaluate()
        if not math.isfinite(ev["val_loss"]) or not math.isfinite(ev["train_loss"]):
            raise self._diverged(f"the evaluation loss is {ev['val_loss']}",
                                 self.lr_at(self.step), step=self.step)
        best = self.best_val_loss is None or ev["val_loss"] < self.best_val_loss
        if best:
            self.best_val_loss = ev["val_loss"]
        self.last_eval = ev
        self._snapshot = self.trainer_state()
        self._log({"event": "eval", **ev, "best": best, "time_s": self._elapsed()})
        self.report("eval", {**ev, "best": best})
        self.report("checkpoint", {"path": str(self.save(self.last_dir, self._snapshot)),
                                   "step": self.step, "kind": "last"})
        if best:
            self.report("checkpoint", {"path": str(self.save(self.best_dir, self._snapshot)),
                                       "step": self.step, "kind": "best"})
        plot_log(self.log_path, self.plot_path, title=str(self.out_dir))

    def _save_on_interrupt(self) -> None:
        """Save the state of the last completed step (unless weights were mid-update)."""
        if self._updating:
            self.report("interrupted", {"step": self.last_saved_step, "path": None})
            return
        path = self.save(self.last_dir, self._snapshot)
        self._log({"event": "interrupted", "step": self._snapshot["step"]})
        self.report("interrupted", {"step": self._snapshot["step"], "path": str(path)})

    # -- log --------------------------------------------------------------------------

    def _start_log(self) -> None:
        """A fresh log, or on resume the old one without records past the resumed step
        (a run that crashed after its last checkpoint logged steps that will be redone)."""
        if self.resumed_from is None:
            self.log_path.unlink(missing_ok=True)
            return
        evaluated = (self.last_eval or {}).get("step") == self.step
        keep = [r for r in read_log(self.log_path)
                if r.get("step", 0) < self.step or
                (r.get("step") == self.step and (r.get("event") != "eval" or evaluated))]
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.log_path)

    def _log(self, record: dict) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _check_resumable(config: TrainConfig, ckpt) -> None:
    saved = (ckpt.trainer_state or {}).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt.path}: cannot resume: no trainer.json with a training config")
    # a field missing from an older checkpoint had its default then (e.g. pos="learned")
    defaults = TrainConfig()
    changed = [f"{k} {saved.get(k, getattr(defaults, k))!r} -> {getattr(config, k)!r}"
               for k in RESUME_FIXED if saved.get(k, getattr(defaults, k)) != getattr(config, k)]
    if changed:
        raise ValueError(f"cannot resume {ckpt.path} with a different model or tokenizer: "
                         f"{'; '.join(changed)}")


class _DeferredInterrupt:
    """While active, a first Ctrl-C only sets `requested`: the loop saves and stops at
    the next step boundary, so a checkpoint never holds a half-applied update. A
    second Ctrl-C interrupts at once. (Only the main thread receives signals.)"""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ---------------------------------------------------------------------------
# The log and the loss plot
# ---------------------------------------------------------------------------


def read_log(path) -> list[dict]:
    """The records of a log.jsonl (a torn last line, from a crash, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_log(log_path, png_path, title: str = "") -> None:
    """Train loss per step and the evaluated train/validation losses, as a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log_path)
    steps = [r for r in records if r.get("event") == "step"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue",
                alpha=0.3, linewidth=0.8, label="train (each step)")
    if evals:
        es = [r["step"] for r in evals]
        ax.plot(es, [r["train_loss"] for r in evals], "o-", color="tab:blue",
                label="train (eval)")
        ax.plot(es, [r["val_loss"] for r in evals], "o-", color="tab:orange",
                label="validation (eval)")
        best = min(r["val_loss"] for r in evals)
        title = f"{title}  best val loss {best:.4f}".strip()
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if steps or evals:
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, png_path)


# ---------------------------------------------------------------------------
# The `tinylm train` command
# ---------------------------------------------------------------------------


def _fields_help() -> str:
    lines = ["configuration fields (--set KEY=VALUE, or keys of a --config JSON file;",
             "defaults are the shakespeare-char-cpu preset's):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  {f.name} = {json.dumps(f.default)}")
        lines.append(textwrap.fill(f.metadata["help"], width=90, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6))
    lines.append("")
    lines.append("presets (--preset NAME):")
    for name, text in PRESET_HELP.items():
        lines.append(f"  {name:<22}{text}")
    lines += ["", "examples:",
              "  tinylm train                                   # a few minutes on a CPU",
              "  tinylm train --data my.txt --out runs/mine --set max_iters=5000",
              "  tinylm train --preset shakespeare-char --device cuda",
              "  tinylm train --resume                          # continue after Ctrl-C"]
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = textwrap.fill(
        "Train a GPT on a text file (default: the bundled Tiny Shakespeare), print the "
        "validation loss and perplexity, save checkpoints and print samples. The "
        "configuration is a preset, then a --config JSON file, then the flags below and "
        "--set, each overriding the last; it is printed in full at the start.", width=90)
    parser.epilog = _fields_help()
    g = parser.add_argument_group("configuration")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"starting configuration (default {DEFAULT_PRESET}); see below")
    g.add_argument("--config", metavar="FILE.json",
                   help='JSON object of fields to override, e.g. {"max_iters": 500} '
                        '(a "preset" key picks the preset; a preset name also works here)')
    g.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one field (repeatable), e.g. --set lr=3e-4")
    g.add_argument("--data", metavar="FILE", help="UTF-8 text file to train on (field data)")
    g.add_argument("--tokenizer", metavar="char|bpe|FILE",
                   help="'char', 'bpe' (trained on the data) or a tokenizer file (field tokenizer)")
    g.add_argument("--out", metavar="DIR", help="run directory (field out_dir)")
    g.add_argument("--device", choices=DEVICES, help="cpu, cuda or auto (field device)")
    g.add_argument("--max-iters", type=int, metavar="N", help="optimizer steps (field max_iters)")
    g.add_argument("--seed", type=int, metavar="N", help="random seed (field seed)")
    r = parser.add_argument_group("run")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from a checkpoint: DIR is a checkpoint or a run directory "
                        "(its last/); without DIR, out_dir/last. The saved configuration is "
                        "used, with --config/--set/flags on top")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh even if out_dir already holds a run")
    r.add_argument("--dry-run", action="store_true",
                   help="print the configuration and exit without training")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = parser.add_argument_group("samples printed at the end (from the best checkpoint)")
    s.add_argument("--samples", type=int, default=2, metavar="N",
                   help="how many (default 2; 0: none)")
    s.add_argument("--sample-tokens", type=int, default=300, metavar="N",
                   help="new tokens per sample (default 300)")
    s.add_argument("--prompt", default="\n", help="text the samples continue (default a newline)")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature, 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=200, metavar="K",
                   help="sample among the K most likely tokens (default 200; 0: all)")


def build_config(args) -> tuple[TrainConfig, str, set[str], str | None]:
    """(config, where it came from, overridden field names, checkpoint to resume or None)."""
    overrides: dict = {}
    preset = args.preset
    if args.config:
        if args.config in PRESETS and not Path(args.config).exists():
            preset = preset or args.config
        else:
            file_fields = config_overrides_from_json(args.config)
            preset = preset or file_fields.pop("preset", None)
            file_fields.pop("preset", None)
            check_field_names(file_fields, args.config)
            overrides.update(file_fields)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    flags = {"data": args.data, "tokenizer": args.tokenizer, "out_dir": args.out,
             "device": args.device, "max_iters": args.max_iters, "seed": args.seed}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_field_value(key.strip(), value.strip())

    if args.resume is None:
        name = preset or DEFAULT_PRESET
        return PRESETS[name].replace(**overrides), f"preset {name}", set(overrides), None

    # Resume: the checkpoint's own configuration, with what was given on top.
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(overrides.get("out_dir") or PRESETS[preset or DEFAULT_PRESET].out_dir)
    ckpt_dir = run_dir if checkpoint.is_checkpoint(run_dir) else run_dir / "last"
    if not checkpoint.is_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir} (looked for {ckpt_dir})")
    state = checkpoint.read_trainer_state(ckpt_dir)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{ckpt_dir}: cannot resume: no trainer.json with a training config")
    saved = TrainConfig.from_dict(state["config"], f"{ckpt_dir}/trainer.json")
    overrides.setdefault("out_dir", str(ckpt_dir.parent))  # the run directory it is in
    changed = {k for k, v in overrides.items() if getattr(saved, k) != v}
    return saved.replace(**overrides), f"resuming {ckpt_dir}", changed, str(ckpt_dir)


def format_config(config: TrainConfig, overridden: set[str]) -> str:
    lines = []
    for name in field_names():
        value = getattr(config, name)
        note = "  *" if name in overridden else ""
        if name == "data" and value is None:
            note += "  (bundled Tiny Shakespeare)"
        lines.append(f"  {name:<22} {json.dumps(value)}{note}")
    return "\n".join(lines)


class ConsoleReporter:
    """Prints a Trainer's events: a tqdm bar (loss, lr, tokens/s, ETA) and one line per eval."""

    def __init__(self, progress: bool = True, stream=None):
        self.progress = progress
        self.stream = stream or sys.stdout
        self.bar = None

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: str, info: dict) -> None:
        if event == "data":
            self.print(info["message"])
        elif event == "start":
            resumed = f", resuming at step {info['step']}" if info["resumed_from"] else ""
            self.print(f"model: {info['params']:,} parameters on {info['device']}; "
                       f"data: {info['train_tokens']:,} train + {info['val_tokens']:,} "
                       f"validation tokens, {info['tokenizer']}{resumed}")
            if self.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=info["max_iters"],
                                initial=min(info["step"], info["max_iters"]),
                                unit="step", dynamic_ncols=True, smoothing=0.05)
        elif event == "step":
            if self.bar is not None:
                self.bar.set_postfix_str(
                    f"loss {info['loss']:.4f}, lr {info['lr']:.2e}, "
                    f"{info['tokens_per_s']:,.0f} tok/s", refresh=False)
                self.bar.update(1)
        elif event == "eval":
            self.print(f"step {info['step']}: train loss {info['train_loss']:.4f}, val loss "
                       f"{info['val_loss']:.4f}, val perplexity {info['val_ppl']:.2f}"
                       + ("  (best so far)" if info["best"] else ""))
        elif event == "interrupted":
            self.close()
            if info["path"]:
                self.print(f"interrupted: saved the state after step {info['step']} to "
                           f"{info['path']}; continue with: tinylm train --resume "
                           f"{Path(info['path']).parent}")
            else:
                self.print(f"interrupted mid-update: the last checkpoint (step {info['step']}) "
                           "is kept")
        elif event == "end":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args) -> int:
    config, source, overridden, resume = build_config(args)
    if args.samples < 0 or args.sample_tokens < 0 or args.top_k < 0 or args.temperature < 0:
        raise ValueError("--samples, --sample-tokens, --top-k and --temperature must be >= 0")
    print(f"tinylm train: {source} (* = overridden)")
    print(format_config(config, overridden), flush=True)
    if args.dry_run:
        return 0
    reporter = ConsoleReporter(progress=not args.no_progress)
    try:
        trainer = Trainer(config, reporter=reporter, resume=resume, overwrite=args.overwrite)
        result = trainer.train()
    finally:
        reporter.close()
    _print_result(result)
    if args.samples:
        _print_samples(trainer, args)
    return 0


def _print_result(r: dict) -> None:
    minutes, seconds = divmod(r["elapsed_s"], 60)
    if r["val_loss"] is not None:
        print(f"done: step {r['step']}, val loss {r['val_loss']:.4f}, val perplexity "
              f"{r['val_ppl']:.2f} (train loss {r['train_loss']:.4f}); best val loss "
              f"{r['best_val_loss']:.4f}; training time {int(minutes)}m{seconds:04.1f}s")
    print(f"checkpoints: {r['best_checkpoint']} (best), {r['last_checkpoint']} (last); "
          f"log {r['log']}; plot {r['plot']}")


def _print_samples(trainer: Trainer, args) -> None:
    from tinylm.sampling import generate

    source = trainer.best_dir if checkpoint.is_checkpoint(trainer.best_dir) else None
    model = checkpoint.load(source, device=trainer.device).model if source else trainer.model
    tok = trainer.tokenizer
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt must give at least one token")
    idx = np.asarray([ids], dtype=np.int64)  # (1, T)
    for i in range(args.samples):
        out = generate(model, idx, args.sample_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, seed=trainer.config.seed + i)
        print(f"--- sample {i + 1} ---")
        print(tok.decode([int(t) for t in to_numpy(out)[0]]))
