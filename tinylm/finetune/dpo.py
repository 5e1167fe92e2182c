"""Direct preference optimisation (DPO, Rafailov et al. 2023): the Trainer, on pairs.

For a prompt x with a chosen reply y_w and a rejected one y_l, with pi the model being
trained and pi_ref the model it started from (frozen),

    r(y)  = beta * (log pi(y | x) - log pi_ref(y | x))        the implicit reward
    loss  = -log sigmoid(r(y_w) - r(y_l))                     mean over the pairs

(tinylm/nn/preference.py has the loss and its backward). The reference never changes,
so its log-probabilities are computed once, before the first step, for every pair
(train and held-out) and kept in out_dir/reference.npz: no second model is held in
memory, and a resumed run reads them back (their SHA-256 is in trainer.json).
With LoRA the reference is simply the starting model (the adapters start at B = 0).

Each step logs, besides the loss, the preference accuracy (the fraction of pairs
whose chosen reward is the higher), the reward margin (mean r(y_w) - r(y_l)) and
both rewards; each evaluation the same on the held-out pairs, all of them.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np

from tinylm.backend import to_device, to_numpy
from tinylm.fileio import FileFormatError, atomic_write
from tinylm.nn import DPOLoss, SequenceLogProb

from .chat import chat_tokens
from .prefs import PrefPair, load_prefs, pair_rows
from .run import FinetuneTrainer
from .sft import describe_files, split_off

REFERENCE_FILE = "reference.npz"


@dataclass
class PairData:
    """The preference pairs of a DPO run (the Trainer's `data`)."""

    tokenizer: object
    train: list[PrefPair]
    val: list[PrefPair]
    note: dict
    ref_train: np.ndarray | None = None  # (N, 2) reference log-probs: chosen, rejected
    ref_val: np.ndarray | None = None  # (M, 2)

    def describe(self) -> dict:
        return self.note


class PairBatches:
    """B random pairs (indices into the training pairs) a batch; its state: the generator."""

    def __init__(self, n: int, batch_size: int, seed):
        self.n, self.B = n, batch_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        return self.rng.integers(0, self.n, size=self.B)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def rows_of(pairs: list[PrefPair], pad_id: int):
    """pair_rows, as long as the longest reply of these pairs."""
    return pair_rows(pairs, max(len(p) for p in pairs) - 1, pad_id)


def sequence_logps(model, pairs: list[PrefPair], pad_id: int, batch_size: int) -> np.ndarray:
    """(N, 2) float64: log pi(chosen | prompt), log pi(rejected | prompt) of each pair,
    with the model in evaluation mode (no dropout)."""
    seq, out, xp = SequenceLogProb(), [], model.xp
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            x, targets, mask = rows_of(chunk, pad_id)
            logp = to_numpy(seq.forward(model.forward(to_device(x, xp)), to_device(targets, xp),
                                        to_device(mask, xp))).astype(np.float64)
            model.clear_backward_caches()
            out.append(np.stack([logp[:len(chunk)], logp[len(chunk):]], axis=1))
    finally:
        model.train(was_training)
    return np.concatenate(out)


class DPOTrainer(FinetuneTrainer):
    """The Trainer on preference pairs; `settings.kind` is "dpo". See the module docstring."""

    def _prepare_data(self, ckpt, tokenizer):
        cfg = self.config
        self._base_model, tok = self._base(ckpt)
        if getattr(cfg, "precision", "fp32") != "fp32":
            raise ValueError(f"tinylm dpo runs in fp32; precision={cfg.precision} is not "
                             "supported here")
        tokens = chat_tokens(tok)  # the start must be a chat model (an SFT checkpoint)
        self.pad_id = tokens.end
        pairs = load_prefs(cfg.data, tok, tokens)
        train, val = split_off(pairs, self.settings.val_data, cfg.val_fraction, cfg.data)
        if self.settings.val_data is not None:
            val = load_prefs(self.settings.val_data, tok, tokens)
        fits = [p for p in train if len(p) - 1 <= cfg.context_length]
        val_fits = [p for p in val if len(p) - 1 <= cfg.context_length]
        if not fits or not val_fits:
            raise ValueError(f"{cfg.data}: no preference pair fits context_length="
                             f"{cfg.context_length}")
        note = describe_files(cfg.data, self.settings.val_data, train_examples=len(fits),
                              val_examples=len(val_fits),
                              dropped=len(train) + len(val) - len(fits) - len(val_fits))
        self.seq, self.dpo = SequenceLogProb(), DPOLoss(self.settings.beta)
        self._stats: list[tuple[float, ...]] = []
        return PairData(tok, fits, val_fits, note)

    def _build_model(self, ckpt):
        model = super()._build_model(ckpt)
        if ckpt is None:  # the starting model is the reference: measure it now, once
            self._reference_from(model)
        else:
            self._reference_read(ckpt)
        return model

    def _reference_from(self, model) -> None:
        B = self.config.batch_size
        self.data.ref_train = sequence_logps(model, self.data.train, self.pad_id, B)
        self.data.ref_val = sequence_logps(model, self.data.val, self.pad_id, B)
        buf = io.BytesIO()
        np.savez(buf, train=self.data.ref_train, val=self.data.ref_val)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.out_dir / REFERENCE_FILE) as f:
            f.write(buf.getvalue())
        self.reference_sha256 = hashlib.sha256(buf.getvalue()).hexdigest()

    def _reference_read(self, ckpt) -> None:
        saved = (ckpt.trainer_state or {}).get("finetune", {}).get("reference_sha256")
        path = ckpt.path.parent / REFERENCE_FILE
        data = path.read_bytes() if path.is_file() else b""
        if not data or hashlib.sha256(data).hexdigest() != saved:
            raise FileFormatError(f"{path}: missing, or not the reference log-probabilities "
                                  "this run computed (its SHA-256 differs); start afresh")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            ref_train, ref_val = z["train"], z["val"]
        if ref_train.shape != (len(self.data.train), 2) or ref_val.shape != (len(self.data.val), 2):
            raise FileFormatError(f"{path}: holds {ref_train.shape[0]} + {ref_val.shape[0]} "
                                  "pairs, not this run's")
        self.data.ref_train, self.data.ref_val = ref_train, ref_val
        self.reference_sha256 = saved

    def _extra_state(self) -> dict:
        return {"reference_sha256": self.reference_sha256}

    def _make_batches(self):
        return PairBatches(len(self.data.train), self.config.batch_size, [self.config.seed, 1])

    # -- one micro-batch, one step, one evaluation -----------------------------------

    def _pair_loss(self, pairs, ref: np.ndarray):
        """policy log-probs -> DPO loss of these pairs (the caches kept for backward)."""
        xp = self.model.xp
        x, targets, mask = rows_of(pairs, self.pad_id)
        logits = self.model.forward(to_device(x, xp))  # (2B, T, V)
        logp = self.seq.forward(logits, to_device(targets, xp), to_device(mask, xp))  # (2B,)
        B = len(pairs)
        ref = to_device(ref, xp)  # (B, 2)
        loss = self.dpo.forward(logp[:B], logp[B:], ref[:, 0], ref[:, 1])
        logp = to_numpy(logp)
        return loss, (self.dpo.accuracy, self.dpo.reward_margin,
                      float(to_numpy(self.dpo.chosen_rewards).mean()),
                      float(to_numpy(self.dpo.rejected_rewards).mean()),
                      float(logp[:B].mean()), float(logp[B:].mean()))

    def forward_backward(self, dscale: float) -> tuple[float, float]:
        idx = self.batches.next()
        loss, stats = self._pair_loss([self.data.train[i] for i in idx], self.data.ref_train[idx])
        d_chosen, d_rejected = self.dpo.backward(dscale)
        xp = self.model.xp
        self.model.backward(self.seq.backward(xp.concatenate([d_chosen, d_rejected])),
                            daux=dscale)
        self._stats.append(stats)
        return loss, 1.0

    def train_step(self) -> dict:
        record = super().train_step()
        record.update(_named(np.mean(self._stats, axis=0)))
        self._stats.clear()
        return record

    def evaluate(self) -> dict:
        cfg = self.config
        out = {"step": self.step}
        self.model.eval()
        try:
            picks = self.eval_rng.integers(0, len(self.data.train),
                                           size=cfg.eval_iters * cfg.batch_size)
            for split, pairs, ref in (
                    ("train", [self.data.train[i] for i in picks], self.data.ref_train[picks]),
                    ("val", self.data.val, self.data.ref_val)):
                losses, stats, sizes = [], [], []
                for s in range(0, len(pairs), cfg.batch_size):
                    loss, st = self._pair_loss(pairs[s:s + cfg.batch_size],
                                               ref[s:s + cfg.batch_size])
                    losses.append(loss)
                    stats.append(st)
                    sizes.append(len(pairs[s:s + cfg.batch_size]))
                self.model.clear_backward_caches()
                out[f"{split}_loss"] = float(np.average(losses, weights=sizes))
                mean = np.average(np.array(stats), axis=0, weights=sizes)
                out.update({f"{split}_{k}": v for k, v in _named(mean).items()})
        finally:
            self.model.train()
        val = out["val_loss"]
        out["val_ppl"] = math.exp(val) if val < 700 else math.inf  # (the Trainer's field)
        return out


def _named(values) -> dict:
    names = ("accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp",
             "rejected_logp")
    return {n: float(v) for n, v in zip(names, values, strict=True)}
