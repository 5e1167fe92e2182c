"""What SFT and DPO runs share: their settings, the model they start from, LoRA, saving.

Both are the pre-training Trainer (tinylm/training/trainer.py) with other parts
plugged in through its hooks: the data (`_prepare_data`), the model (`_build_model`),
the batches (`_make_batches`), one micro-batch's loss (`forward_backward`), the
evaluation batches (`eval_batch`), restoring (`_restore`) and writing (`_write`).
The loop, the schedule, clipping, evaluations, checkpoints, the log, the plot,
Ctrl-C/SIGTERM and resuming are the Trainer's own.

The model a run starts from ("the base") is a tinylm checkpoint or a Hugging Face
GPT-2 directory. An SFT run gives its tokenizer the chat tokens and its embedding
the rows for them (vocab.py). With `lora_rank > 0` the base is frozen and LoRA
adapters are trained, plus the token embedding when rows were added: new tokens
have no meaning yet, and no adapter on attention could give them one.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass

from tinylm import checkpoint, lora
from tinylm.training.memory import check_step_memory
from tinylm.training.resume import restore_state
from tinylm.training.rundir import naming
from tinylm.training.saving import step_in
from tinylm.training.trainer import Trainer

from . import store
from .chat import add_chat_tokens
from .vocab import grow_vocab

KINDS = ("sft", "dpo")


@dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tuning run adds to TrainConfig; trainer.json keeps it ("finetune")."""

    kind: str  # "sft" (chat data, cross-entropy on the replies) or "dpo" (preference pairs)
    base: str  # the checkpoint directory (or Hugging Face GPT-2 directory) it starts from
    base_format: str = "tinylm"  # "tinylm" or "hf-gpt2"
    val_data: str | None = None  # held-out file; None: the last val_fraction of the data
    lora_rank: int = 0  # 0: every weight is trained (a full fine-tune)
    lora_alpha: float = 16.0  # the adapters' scale is alpha / rank
    lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS  # which Linears get adapters
    pack: bool = False  # SFT: several conversations a row (data.py) instead of one
    beta: float = 0.1  # DPO: the strength of the pull back towards the reference
    score_data: str | None = None  # a scored chat file to answer after training (tasks.py)

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.kind not in KINDS:
            raise ValueError(f"finetune kind must be one of {KINDS}, got {self.kind!r}")
        if self.base_format not in ("tinylm", "hf-gpt2"):
            raise ValueError(f"base_format must be tinylm or hf-gpt2, got {self.base_format!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
                or self.lora_rank < 0:
            raise ValueError(f"--lora RANK must be an int >= 0, got {self.lora_rank!r}")
        if not self.lora_alpha > 0 or not self.beta > 0:
            raise ValueError(f"--lora-alpha and --beta must be > 0, got {self.lora_alpha!r} "
                             f"and {self.beta!r}")

    def lora(self) -> dict:
        """The LoRA settings, as the adapter store records them."""
        return {"rank": self.lora_rank, "alpha": self.lora_alpha,
                "targets": list(self.lora_targets)}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "lora_targets": list(self.lora_targets)}

    @classmethod
    def from_dict(cls, d, where: str) -> FinetuneSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or "kind" not in d or "base" not in d:
            raise ValueError(f"{where}: damaged fine-tuning settings (\"finetune\")")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: damaged fine-tuning settings: {exc}") from None


def load_base(settings: FinetuneSettings, device: str, dtype: str):
    """(model, tokenizer) of the base, on `device` in `dtype`."""
    if settings.base_format == "hf-gpt2":
        from tinylm.interop import load_hf_gpt2

        model, tokenizer = load_hf_gpt2(settings.base, device=device, dtype=dtype)
    else:
        ckpt = checkpoint.load(settings.base, device=device)
        model, tokenizer = ckpt.model.to(device, dtype), ckpt.tokenizer
    if tokenizer is None:
        raise ValueError(f"{settings.base}: the base has no tokenizer: fine-tuning needs one "
                         "(its special tokens are added to it)")
    return model, tokenizer


class FinetuneTrainer(Trainer):
    """A Trainer whose model comes from a base (and, with LoRA, whose checkpoints hold the
    merged model while adapters/step-N/ holds what resumes exactly: store.py)."""

    def __init__(self, config, settings: FinetuneSettings, *, reporter=None, resume=None,
                 overwrite: bool = False):
        self.settings = settings  # the hooks, called from Trainer.__init__, read it
        super().__init__(config, reporter=reporter, resume=resume, overwrite=overwrite)

    # -- the model ------------------------------------------------------------------

    def _base(self, ckpt):
        """(model, tokenizer) to start from: the checkpoint resumed (a full fine-tune),
        else the base; an SFT run adds the chat tokens and their embedding rows."""
        cfg = self.config
        self.grew = False  # rows were added to the embedding (SFT of a base without chat tokens)
        if ckpt is not None and not self.settings.lora_rank:
            return ckpt.model, ckpt.tokenizer
        model, tokenizer = load_base(self.settings, self.device, cfg.dtype)
        if self.settings.kind == "sft":
            tokenizer = add_chat_tokens(tokenizer)
            self.grew = tokenizer.vocab_size > model.config.vocab_size
            model = grow_vocab(model, max(tokenizer.vocab_size, model.config.vocab_size),
                               seed=cfg.seed)
        return model, tokenizer

    def _build_model(self, ckpt):
        model = self._base_model
        check_step_memory(self.config, model.config.vocab_size, self.device)
        if self.settings.lora_rank:
            s = self.settings
            lora.add_lora(model, rank=s.lora_rank, alpha=s.lora_alpha, targets=s.lora_targets,
                          seed=self.config.seed)
            if self.grew:  # the new tokens' rows (and an untied head's columns) must learn
                lora.unfreeze(model.tok_emb)
                if not model.config.tie_weights:
                    lora.unfreeze(model.head)
            if ckpt is not None:
                step = (ckpt.trainer_state or {}).get("step")
                self._lora_optimizer = store.load_trained(ckpt.path.parent, step, model,
                                                          s.lora())
        return model

    # -- saving and resuming --------------------------------------------------------

    def trainer_state(self) -> dict:
        state = super().trainer_state()
        state["finetune"] = {"settings": self.settings.to_dict(), "grew": self.grew,
                             **self._extra_state()}
        return state

    def _extra_state(self) -> dict:
        return {}

    def _restore(self, ckpt) -> None:
        if self.settings.lora_rank:  # AdamW's state is in adapters/step-N/
            ckpt = dataclasses.replace(ckpt, optimizer_state=self._lora_optimizer)
        restore_state(self, ckpt)

    def _write(self, directory, optimizer, state):
        if not self.settings.lora_rank:
            return super()._write(directory, optimizer, state)
        store.save_trained(self.out_dir, state["step"], self.model, self.optimizer,
                           self.settings.lora())
        merged = store.merged_model(self.model)
        try:
            with naming(directory):
                path = checkpoint.save(directory, merged, None, self.tokenizer, state)
        except BaseException:
            tmp = directory.with_name(directory.name + ".tmp")
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        store.prune(self.out_dir, {s for s in (step_in(self.last_dir), step_in(self.best_dir),
                                               state["step"]) if s is not None})
        return path


def trainable_summary(model) -> dict:
    """{"trainable": values trained, "total": all values}: what LoRA saves."""
    trained = sum(int(p.size) for _, p, _ in model.parameters())
    total = sum(int(a.size) for a in lora.full_state_dict(model).values())
    return {"trainable": trained, "total": total}

