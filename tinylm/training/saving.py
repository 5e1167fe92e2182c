"""Saving a run's checkpoints, and the errors that stop a run saying which one is kept.

    write_checkpoint(directory, model, ...)  checkpoint.save, leaving no "<dir>.tmp/" behind
    save_on_interrupt(trainer, signal)       Ctrl-C / SIGTERM: save the last completed step
    write_failed(trainer, exc)               a full disk: the OSError that says what is kept
    diverged(trainer, what, lr)              a non-finite loss: TrainingDiverged, logged
    step_in(directory)                       the step a saved checkpoint holds

The Trainer (trainer.py) decides when to save (`Trainer.save`, after each evaluation);
these are the plumbing around it, kept apart so that the loop reads on its own.
Functions of the trainer, as resume.py's are: they read its run directory, counters
and last snapshot.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tinylm import checkpoint
from tinylm.fileio import naming


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing was saved after it."""


def write_checkpoint(directory: Path, model, optimizer, tokenizer, state: dict) -> Path:
    """checkpoint.save, and on failure the removal of its temporary "<directory>.tmp/"
    (checkpoint.save leaves the previous checkpoint untouched), so none is left."""
    try:
        with naming(directory):
            return checkpoint.save(directory, model, optimizer, tokenizer, state)
    except BaseException:
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_on_interrupt(trainer, signal_name: str) -> None:
    """Save the state of the last completed step (unless weights were mid-update)."""
    if trainer._updating:
        trainer.report("interrupted", {"step": trainer.last_saved_step, "path": None,
                                       "signal": signal_name})
        return
    try:
        path = trainer.save(trainer.last_dir, trainer._snapshot)
        trainer.run_dir.log({"event": "interrupted", "step": trainer._snapshot["step"],
                             "signal": signal_name})
    except OSError as exc:  # the disk filled up: the previous checkpoint is what is left
        raise write_failed(trainer, exc) from exc
    trainer.report("interrupted", {"step": trainer._snapshot["step"], "path": str(path),
                                   "signal": signal_name})


def write_failed(trainer, exc: OSError) -> OSError:
    """The error for a write that failed mid-run: what failed, and what is kept."""
    what = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror or str(exc)
    message = (f"{what}: training stopped at step {trainer.step}; {kept(trainer)}; make room "
               f"(or fix the directory), then: tinylm train --resume {trainer.out_dir}")
    error = OSError(exc.errno, message)
    error.agreed = getattr(exc, "agreed", False)  # raised by every rank (run_on_root)
    return error


def kept(trainer) -> str:
    """Which checkpoint a stopped run leaves to resume from."""
    if trainer.last_saved_step is None:
        return "no checkpoint was saved"
    return (f"the last good checkpoint, {trainer.last_dir} (step {trainer.last_saved_step}), "
            "is kept")


def diverged(trainer, what: str, lr: float, step: int | None = None) -> TrainingDiverged:
    """The error for a non-finite number at `step` (default: the step being taken)."""
    step = trainer.step + 1 if step is None else step
    message = (f"{what} at step {step} (lr {lr:.3g}): training stopped and "
               f"{kept(trainer)}; lower lr, raise warmup_iters or set grad_clip, then resume")
    trainer.run_dir.log({"event": "diverged", "step": step, "message": message})
    error = TrainingDiverged(message)
    error.agreed = trainer.comm.size > 1  # every rank saw the same (all-reduced) number
    return error


def step_in(directory) -> int | None:
    """The step a checkpoint directory holds, or None (no checkpoint, or unreadable)."""
    try:
        step = (checkpoint.read_trainer_state(directory) or {}).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
