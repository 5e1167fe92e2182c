"""TrainConfig: everything a training run depends on, in one frozen dataclass.

Its fields come in three groups, in this order (that of `--help` and of the
configuration `tinylm train` prints):

    data     the text and its tokens (_DataFields below)
    model    GPTConfig's fields, all but vocab_size (the tokenizer decides it). They
             are declared once, in tinylm/config.py, with their help text; TrainConfig
             takes them from there, with the CPU recipe's values (RECIPE_MODEL) where
             GPTConfig has no default or another one
    the run  dtype, optimisation, evaluation, seed, device, out_dir (TrainConfig's own)

A field's type is its annotation, resolved by `typing.get_type_hints`: `--set`
parses a value by it and `__post_init__` checks it. A field marked fixed_on_resume
(every model field, and those that decide the tokens) cannot change on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field

from tinylm.backend import DEVICES
from tinylm.config import MAX_INT_FIELDS, GPTConfig
from tinylm.fileio import read_json


def _opt(default, doc: str, fixed_on_resume: bool = False):
    """A TrainConfig field; its help text appears in `--help`."""
    return field(default=default, metadata={"help": doc, "fixed_on_resume": fixed_on_resume})


@dataclass(frozen=True)
class _DataFields:
    """The first fields of a TrainConfig: the text and how it becomes tokens."""

    data: str | None = _opt(None, "UTF-8 text file to train on; null: the bundled Tiny Shakespeare")
    tokenizer: str = _opt("char", "'char' (one id per character), 'bpe' (byte-level BPE trained "
                                  "on the data) or the path of a tokenizer JSON file",
                          fixed_on_resume=True)
    vocab_size: int = _opt(512, "ids of the BPE tokenizer trained when tokenizer='bpe' "
                                "(256 bytes + merges)", fixed_on_resume=True)
    tokenizer_train_chars: int = _opt(2_000_000, "tokenizer='bpe' learns its merges from at most "
                                                 "this many leading characters of the data",
                                      fixed_on_resume=True)
    val_fraction: float = _opt(0.1, "the last val_fraction of the tokens is the validation split",
                               fixed_on_resume=True)


# The model fields: every GPTConfig field but vocab_size, which the tokenizer decides.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size")

# The CPU recipe's model (nanoGPT's): the only place where TrainConfig's model
# defaults differ from GPTConfig's (which has none for the shape, and GPT-2's biases).
RECIPE_MODEL = dict(context_length=64, d_model=128, n_layers=4, n_heads=4, bias=False)


def _model_field(f: dataclasses.Field, types: dict) -> tuple:
    """GPTConfig's field `f` as a TrainConfig field: its type, help, recipe default."""
    default = RECIPE_MODEL.get(f.name, f.default)
    if default is dataclasses.MISSING:
        raise TypeError(f"RECIPE_MODEL must give GPTConfig.{f.name} a default")
    metadata = {**f.metadata, "fixed_on_resume": True}  # a resumed model keeps its shape
    return f.name, types[f.name], field(default=default, metadata=metadata)


# GPTConfig's fields, after the data fields: a dataclass generated from GPTConfig,
# so that no model field is declared twice.
_ModelFields = dataclasses.make_dataclass(
    "_ModelFields",
    [_model_field(f, typing.get_type_hints(GPTConfig))
     for f in dataclasses.fields(GPTConfig) if f.name in MODEL_FIELDS],
    bases=(_DataFields,), frozen=True, namespace={"__module__": __name__})


@dataclass(frozen=True)
class TrainConfig(_ModelFields):
    """Everything a training run depends on: the data fields, GPTConfig's fields, then
    the ones below. The defaults are the shakespeare-char-cpu preset (nanoGPT's CPU
    recipe for Tiny Shakespeare)."""

    dtype: str = _opt("float32", "parameter and activation dtype: float32 or float64",
                      fixed_on_resume=True)
    precision: str = _opt("fp32", "compute format: fp32, or fp16/bf16 mixed precision (float32 "
                                  "master weights and AdamW, 16-bit compute emulated on the "
                                  "CPU; docs/precision.md)")
    loss_scaling: bool = _opt(True, "precision=fp16 only: dynamic loss scaling (false: none, to "
                                    "see gradients underflow)")
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
    recompute: bool = _opt(False, "recompute each block's activations in backward (gradient "
                                  "checkpointing): far less memory, ~1/3 more compute, the "
                                  "same gradients")
    zero: bool = _opt(False, "ZeRO-1 for data-parallel runs (mpirun -n N): each process keeps "
                             "1/N of AdamW's moments (docs/distributed.md)")
    # -- evaluation, logging, run --
    eval_interval: int = _opt(250, "evaluate (and save checkpoints) every this many steps")
    eval_iters: int = _opt(20, "random batches per split in each evaluation")
    log_interval: int = _opt(1, "write a step record to log.jsonl every this many steps")
    seed: int = _opt(1337, "seeds the weights, the batch sampler, dropout and evaluation")
    device: str = _opt("cpu", "cpu, cuda (CuPy) or auto (cuda when usable)")
    out_dir: str = _opt("runs/shakespeare-char-cpu", "run directory: checkpoints, log, plot, "
                                                     "token cache")

    def __post_init__(self):
        for name in field_names():
            self._check_type(name)
        self._check_values()
        try:
            self.gpt_config(vocab_size=1)  # GPTConfig checks the model's fields
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid model shape: {exc}") from None

    def _check_type(self, name: str) -> None:
        base, optional = field_kind(name)
        value = getattr(self, name)
        if value is None and optional:
            return
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(self, name, float(value))  # 1 means 1.0
            return
        if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
            kind = base.__name__ + (" or null" if optional else "")
            raise TypeError(f"TrainConfig.{name} must be {kind}, got {value!r}")

    def _check_values(self) -> None:
        def bad(name, rule):
            raise ValueError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        # Infinity passes `lr > 0` and NaN fails every comparison, so a range check
        # alone lets them through (grad_clip=nan trained, then could not be saved):
        # every float field is checked to be finite first.
        for name in field_names():
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(name, "a finite number")
        for name in ("vocab_size", "tokenizer_train_chars", "batch_size", "grad_accum_steps",
                     "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                bad(name, ">= 1")
        for name in ("max_iters", "warmup_iters", "seed"):
            if getattr(self, name) < 0:
                bad(name, ">= 0")
        if self.vocab_size > MAX_INT_FIELDS["vocab_size"]:
            bad("vocab_size", f"<= {MAX_INT_FIELDS['vocab_size']} (GPTConfig's limit)")
        if not 0.0 < self.val_fraction < 1.0:
            bad("val_fraction", "in (0, 1)")
        for name in ("beta1", "beta2", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "in [0, 1)")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                bad(name, "> 0")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"in [0, lr={self.lr}]")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                bad(name, ">= 0 (grad_clip 0: no clipping)" if name == "grad_clip" else ">= 0")
        if self.lr_decay_iters is not None and self.lr_decay_iters < self.warmup_iters:
            bad("lr_decay_iters", f">= warmup_iters ({self.warmup_iters})")
        if self.tokenizer == "bpe" and self.vocab_size < 256:
            bad("vocab_size", ">= 256 for a BPE tokenizer (the bytes)")
        if self.device not in DEVICES:
            bad("device", f"one of {DEVICES}")
        if self.dtype not in ("float32", "float64"):
            bad("dtype", "float32 or float64")
        if self.precision not in ("fp32", "fp16", "bf16"):
            bad("precision", "fp32, fp16 or bf16")
        if not self.tokenizer or not self.out_dir:
            raise ValueError("TrainConfig.tokenizer and out_dir must not be empty")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model this run trains, for a tokenizer with `vocab_size` ids."""
        return GPTConfig(vocab_size=vocab_size, **{n: getattr(self, n) for n in MODEL_FIELDS})

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


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


# The fields a resumed run cannot change: they fix the model's shape or its tokens.
RESUME_FIXED = tuple(f.name for f in dataclasses.fields(TrainConfig)
                     if f.metadata["fixed_on_resume"])


def check_field_names(d: dict, source: str) -> None:
    unknown = sorted(set(d) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown TrainConfig field{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)} in {source}; "
                         f"valid fields: {', '.join(field_names())}")


@functools.cache
def _field_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)  # the annotations as type objects


def field_kind(name: str) -> tuple[type, bool]:
    """(base type, accepts None) of a field: `int | None` gives (int, True)."""
    annotation = _field_types()[name]
    args = typing.get_args(annotation)  # (int, NoneType) for int | None; () for int
    if not args:
        return annotation, False
    return next(a for a in args if a is not type(None)), type(None) in args


def parse_field_value(name: str, text: str):
    """A --set value, typed by the field: "3" -> 3, "1e-3" -> 0.001, "true", "null"."""
    check_field_names({name: None}, "--set")
    base, optional = field_kind(name)
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


def read_config_file(path) -> dict:
    """The fields of a JSON config file: a flat object, {"lr": 3e-4, "d_model": 256}."""
    return read_json(path, what="config file")


def resume_changes(config: TrainConfig, saved: dict) -> list[str]:
    """The fixed-on-resume fields that `config` changes from a saved config dict, as
    "name old -> new". A field missing from an older checkpoint had its default then
    (e.g. pos="learned", before the variants existed)."""
    defaults = TrainConfig()
    changes = []
    for name in RESUME_FIXED:
        old, new = saved.get(name, getattr(defaults, name)), getattr(config, name)
        if old != new:
            changes.append(f"{name} {old!r} -> {new!r}")
    return changes
