"""Resuming: what a checkpoint's trainer.json holds, and how a Trainer gets it back.

A step depends on more than the weights and AdamW's moments: on the batch
sampler's generator, on every dropout layer's generator, and (for when the next
evaluation falls) on the evaluation generator. trainer.json holds all of them, so
on the CPU a resumed run ends with bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

from tinylm import checkpoint
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
    try:
        opt, cfg = trainer.optimizer, trainer.config
        opt.load_state_dict(ckpt.optimizer_state)
        # the hyper-parameters given now win over the saved ones
        opt.betas, opt.eps, opt.weight_decay = (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay
        trainer.step = int(state["step"])
        trainer.tokens_seen = int(state["tokens_seen"])
        trainer.best_val_loss = state["best_val_loss"]
        trainer.last_eval = state["last_eval"]
        trainer.elapsed_s = float(state["elapsed_s"])
        rng = state["rng"]
        trainer.batches.load_state_dict({"rng": rng["batches"]})
        trainer.eval_rng.bit_generator.state = rng["eval"]
        drops = dropout_layers(trainer.model)
        if len(rng["dropout"]) != len(drops):
            raise ValueError(f"{len(rng['dropout'])} dropout generators for {len(drops)} layers")
        for layer, s in zip(drops, rng["dropout"], strict=True):
            layer.rng.bit_generator.state = s
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: damaged trainer state ({type(exc).__name__}: {exc})") \
            from None
