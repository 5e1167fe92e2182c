"""Resuming: what a checkpoint's trainer.json holds, and how a Trainer gets it back.

A step depends on more than the weights and AdamW's moments: on the batch
sampler's generator, on every dropout layer's generator, and (for when the next
evaluation falls) on the evaluation generator. trainer.json holds all of them, so
on the CPU a resumed run ends with bitwise the same weights as an uninterrupted one.

trainer.json is a file, and a checkpoint may come from anyone: what the Trainer
takes from it is checked first (`check_state`: types and ranges, one line naming
the file), and the training text its config names is used only when it is the
very file the run was trained on (`saved_data_path`).
"""

from __future__ import annotations

import math
from pathlib import Path

from tinylm import checkpoint
from tinylm.data import file_sha256
from tinylm.fileio import shorten
from tinylm.nn import Dropout
from tinylm.training.config import TrainConfig, resume_changes

TRAINER_FORMAT = "tinylm-trainer"
TRAINER_VERSION = 1


def dropout_layers(model) -> list[Dropout]:
    return [m for m in model.modules() if isinstance(m, Dropout)]


def capture_state(trainer) -> dict:
    """What trainer.json holds: enough, with the weights and AdamW, to continue exactly."""
    return {
        "format": TRAINER_FORMAT, "version": TRAINER_VERSION,
        "step": trainer.step, "tokens_seen": trainer.tokens_seen,
        "best_val_loss": trainer.best_val_loss, "last_eval": trainer.last_eval,
        "elapsed_s": trainer._elapsed(),
        "config": trainer.config.to_dict(), "data": trainer.data.describe(),
        "rng": {
            "batches": trainer.batches.state_dict()["rng"],
            "eval": trainer.eval_rng.bit_generator.state,
            "dropout": [d.rng.bit_generator.state for d in dropout_layers(trainer.model)],
        },
        # fp16's loss scale and its counters: a resumed run goes on with the same scale
        "loss_scaler": None if trainer.scaler is None else trainer.scaler.state_dict(),
    }


def open_checkpoint(resume, config: TrainConfig, device: str) -> checkpoint.Checkpoint:
    """The checkpoint `resume` (a directory or a loaded Checkpoint), once it is known
    that `config` keeps its model and tokens (RESUME_FIXED)."""
    ckpt = resume if isinstance(resume, checkpoint.Checkpoint) else \
        checkpoint.load(resume, device=device)
    saved = (ckpt.trainer_state or {}).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt.path}: cannot resume: no trainer.json with a training config")
    changes = resume_changes(config, saved)
    if changes:
        raise ValueError(f"cannot resume {ckpt.path} with a different model or tokenizer: "
                         f"{'; '.join(changes)}")
    return ckpt


def restore_state(trainer, ckpt: checkpoint.Checkpoint) -> None:
    """Put AdamW's state, the counters and the generators of `ckpt` into `trainer`
    (whose model is already the checkpoint's)."""
    state, where = ckpt.trainer_state, ckpt.path / "trainer.json"
    if ckpt.optimizer_state is None or state is None:
        raise ValueError(f"{ckpt.path}: cannot resume: the checkpoint has no optimizer.npz "
                         "or trainer.json (it holds weights only)")
    if state.get("format") != TRAINER_FORMAT or state.get("version") != TRAINER_VERSION:
        raise ValueError(f"{where}: not a version-{TRAINER_VERSION} tinylm trainer state")
    drops = dropout_layers(trainer.model)
    check_state(state, where, n_dropout=len(drops))
    opt, cfg = trainer.optimizer, trainer.config
    try:
        opt.load_state_dict(ckpt.optimizer_state)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{ckpt.path / 'optimizer.npz'}: damaged optimizer state "
                         f"({type(exc).__name__}: {shorten(exc)})") from None
    # the hyper-parameters given now win over the saved ones
    opt.betas, opt.eps, opt.weight_decay = (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay
    trainer.step = state["step"]
    trainer.tokens_seen = state["tokens_seen"]
    trainer.best_val_loss = state["best_val_loss"]
    trainer.last_eval = state["last_eval"]
    trainer.elapsed_s = float(state["elapsed_s"])
    rng = state["rng"]
    trainer.batches.load_state_dict({"rng": rng["batches"]})
    trainer.eval_rng.bit_generator.state = rng["eval"]
    for layer, s in zip(drops, rng["dropout"], strict=True):
        layer.rng.bit_generator.state = s
    scaler_state = state.get("loss_scaler")  # absent before precision=fp16 existed
    if trainer.scaler is not None and scaler_state is not None:
        try:
            trainer.scaler.load_state_dict(scaler_state)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: damaged trainer state: loss_scaler "
                             f"({shorten(exc)})") from None


# -- checking trainer.json: a file, so it is checked before anything of it is used ------

MAX_STEP = 2**53  # beyond it a step count is no longer exact in JSON readers


def check_state(state: dict, where, n_dropout: int) -> None:
    """Raise ValueError naming `where` (and the key) unless every value the Trainer
    uses has its type and range: counters ints >= 0, losses finite numbers, the
    generators' states PCG64 states, one per dropout layer."""
    def bad(key, rule):
        raise ValueError(f"{where}: damaged trainer state: {key} must be {rule}")

    for key in ("step", "tokens_seen"):
        if not _is_int(state.get(key)) or not 0 <= state[key] <= MAX_STEP:
            bad(key, f"an int in [0, {MAX_STEP}]")
    if not _is_number(state.get("elapsed_s")) or state["elapsed_s"] < 0:
        bad("elapsed_s", "a number >= 0")
    if state.get("best_val_loss") is not None and not _is_number(state["best_val_loss"]):
        bad("best_val_loss", "a finite number or null")
    last_eval = state.get("last_eval")
    if last_eval is not None:
        if not isinstance(last_eval, dict) or not _is_int(last_eval.get("step")) or not all(
                _is_number(last_eval.get(k)) for k in ("train_loss", "val_loss")):
            bad("last_eval", 'null or {"step": int, "train_loss": number, "val_loss": number}')
    rng = state.get("rng")
    if not isinstance(rng, dict):
        bad("rng", "an object of generator states")
    for key in ("batches", "eval"):
        if not _is_pcg64_state(rng.get(key)):
            bad(f"rng.{key}", "a PCG64 generator state")
    drops = rng.get("dropout")
    if not isinstance(drops, list) or len(drops) != n_dropout:
        bad("rng.dropout", f"a list of {n_dropout} generator states (one per dropout layer)")
    if not all(_is_pcg64_state(d) for d in drops):
        bad("rng.dropout", "a list of PCG64 generator states")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_pcg64_state(s) -> bool:
    """As `np.random.PCG64().state`: {"bit_generator": "PCG64", "state": {"state": int,
    "inc": int}, "has_uint32": 0 or 1, "uinteger": int}, each int in its range."""
    if not isinstance(s, dict) or s.get("bit_generator") != "PCG64":
        return False
    inner = s.get("state")
    return (isinstance(inner, dict)
            and all(_is_int(inner.get(k)) and 0 <= inner[k] < 2**128 for k in ("state", "inc"))
            and s.get("has_uint32") in (0, 1) and _is_int(s.get("has_uint32"))
            and _is_int(s.get("uinteger")) and 0 <= s["uinteger"] < 2**32)


# -- the training text a checkpoint names -----------------------------------------------


def saved_data_path(state: dict, where) -> str | None:
    """The training text that trainer.json's config names, once it is known to be the
    very file the run was trained on (None: the bundled Tiny Shakespeare).

    trainer.json is a file, and files travel: its config could name any local file
    (a key, a password file) as training data, which a resumed run would read, train
    on and print samples of. So the path is used only when the file there has the
    size and SHA-256 recorded in trainer.json's "data" when the run tokenized it:
    whoever wrote those numbers knew the file already. Messages quote no content.
    """
    path = state["config"].get("data")
    if path is None:
        return None
    record = state.get("data")
    shown = shorten(path)  # the path is trainer.json's content: quoted, cut short
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ValueError(f"{where}: no fingerprint of the training data {shown} to check "
                         "it by; give the data file with --data FILE")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{where}: the training data {shown} is not a file here; "
                                "give the data file with --data FILE")
    size = record.get("bytes")
    if (_is_int(size) and file.stat().st_size != size) or file_sha256(file) != record["sha256"]:
        raise ValueError(f"{where}: {shown} is not the file this run was trained on (its size "
                         "or SHA-256 differs from the recorded ones); give the data file "
                         "with --data FILE")
    return path
