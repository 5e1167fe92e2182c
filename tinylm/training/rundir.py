"""The run directory: what is in it, what may be written there, and how.

    out_dir/last/      checkpoint to resume from (see tinylm/checkpoint.py)
    out_dir/best/      checkpoint with the lowest validation loss so far
    out_dir/log.jsonl  one JSON record per step, evaluation and event
    out_dir/loss.png   train and validation loss curves
    out_dir/tokens.npy the tokenized text (memory-mapped; tinylm/data.py writes it,
                       with its note tokens.json)
    out_dir/.lock      held while a run writes here (lock.py)

The Trainer decides what to write and when; this module knows where and how:
the log is appended a line at a time (a crash tears at most the last line, which
`read_log` skips), the plot and a rewritten log replace the old file atomically.
Before a run writes anything, `check_layout` and `check_not_foreign` make sure
it may: no symbolic links among these names (every save would fail on them, or
write through them), and no fresh run over a directory of someone else's files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from tinylm import checkpoint
from tinylm.data import TOKENS_FORMAT
from tinylm.fileio import atomic_write, naming, read_json, write_text
from tinylm.training.lock import LOCK_NAME, is_lock_file

CHECKPOINT_NAMES = ("last", "best")
FILE_NAMES = ("log.jsonl", "loss.png", "tokens.npy", "tokens.json", LOCK_NAME)
# What an interrupted write leaves (checkpoint.save's "<name>.tmp/" and ".old/",
# fileio.atomic_write's "<file>.tmp", data.encode_file's "tokens.npy.raw.tmp").
TMP_NAMES = tuple(f"{n}.tmp" for n in CHECKPOINT_NAMES + FILE_NAMES) + ("tokens.npy.raw.tmp",)
RUN_NAMES = (CHECKPOINT_NAMES + FILE_NAMES + TMP_NAMES
             + tuple(f"{n}.old" for n in CHECKPOINT_NAMES))


class RunDir:
    """The paths of a run directory, its log and its plot."""

    def __init__(self, path):
        self.path = Path(path)
        self.last_dir, self.best_dir = self.path / "last", self.path / "best"
        self.log_path, self.plot_path = self.path / "log.jsonl", self.path / "loss.png"

    def check_layout(self) -> None:
        """Refuse, before anything is written, a run directory this run cannot use:
        out_dir naming a file, a symbolic link among the run's names (checkpoint.save
        cannot replace a linked last/ and every later save would fail, losing the steps
        since; a linked log would be appended through), last/ or best/ not a directory."""
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{self.path}: out_dir names a file, not a directory; "
                                     "give a new directory or a run's (--out DIR)")
        if self.path.is_dir() and not os.access(self.path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "the run directory is not writable",
                                  str(self.path))
        for name in RUN_NAMES:
            entry = self.path / name
            if entry.is_symlink():
                raise ValueError(
                    f"{entry} is a symbolic link: a run replaces its files atomically and "
                    "cannot replace a link (saves would fail, or write through it); put the "
                    "real directory or file there, or choose another --out")
        for name in CHECKPOINT_NAMES:
            entry = self.path / name
            if entry.exists() and not entry.is_dir():
                raise ValueError(f"{entry} is a file, not a checkpoint directory: move it "
                                 "away or choose another --out")

    def holds_run(self) -> bool:
        """True when the directory bears a mark only tinylm leaves: its .lock, a
        checkpoint in last/ or best/, or a token-cache note."""
        if is_lock_file(self.path / LOCK_NAME):
            return True
        if any(checkpoint.is_checkpoint(self.path / n) for n in CHECKPOINT_NAMES):
            return True
        note = self.path / "tokens.json"
        try:
            return note.is_file() and read_json(note).get("format") == TOKENS_FORMAT
        except (OSError, ValueError):
            return False

    def check_not_foreign(self) -> None:
        """Refuse to write a run into a non-empty directory that holds no run: its
        log.jsonl, loss.png or tokens.* would be replaced without a word."""
        if not self.path.is_dir() or self.holds_run():
            return
        with os.scandir(self.path) as entries:
            if next(entries, None) is None:
                return
        raise ValueError(
            f"{self.path} is not empty and holds no tinylm run: a run there would replace "
            "files of yours (log.jsonl, loss.png, tokens.npy, ...); give a new or empty "
            "directory (--out DIR), or --resume a run")

    def remove_leftovers(self) -> None:
        """Delete the temporary files and directories of a run that was killed while
        writing. Only with the lock held: then no other process is writing them."""
        for name in TMP_NAMES:
            entry = self.path / name
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def check_unused(self) -> None:
        """Refuse to start a run afresh over an existing one (its checkpoints would go)."""
        if checkpoint.is_checkpoint(self.last_dir):
            state = checkpoint.read_trainer_state(self.last_dir) or {}
            raise ValueError(
                f"{self.path} already holds a run (checkpoint at step {state.get('step', '?')}"
                f"); resume it, overwrite it, or choose another out_dir "
                "(tinylm train: --resume, --overwrite, --out DIR)")

    def start_log(self, resumed_step: int | None = None, evaluated: bool = False) -> None:
        """A fresh log; or, resuming at `resumed_step`, the old one without the records
        after it (a run that crashed after its last checkpoint logged steps that will be
        redone). `evaluated`: the checkpoint was saved after that step's evaluation."""
        self.path.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            self.log_path.unlink(missing_ok=True)
            return
        keep = [r for r in read_log(self.log_path)
                if r.get("step", 0) < resumed_step or
                (r.get("step") == resumed_step and (r.get("event") != "eval" or evaluated))]
        write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        # O_NOFOLLOW: a log.jsonl linked elsewhere must not be appended through
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with naming(self.log_path), open(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        with naming(self.plot_path):
            plot_log(self.log_path, self.plot_path, title=str(self.path))


class ReaderRunDir(RunDir):
    """The run directory as the ranks other than 0 of a data-parallel run see it: they
    read the token cache and checkpoints, and write nothing (rank 0 writes)."""

    def check_unused(self) -> None:
        pass

    def remove_leftovers(self) -> None:
        pass

    def start_log(self, resumed_step: int | None = None, evaluated: bool = False) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def plot(self) -> None:
        pass




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
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png")


def find_checkpoint(path, names=("last",)) -> Path | None:
    """The checkpoint `path` names: `path` itself when it is a checkpoint, else the
    first of `names` inside it (a run directory). Each may be found through its
    ".old" fallback, left by a save cut off between its two renames (checkpoint.py).
    None when there is none. `train --resume` and `generate --checkpoint` both use it."""
    path = Path(path)
    for candidate in (path, *(path / name for name in names)):
        if checkpoint.is_checkpoint(candidate):
            return candidate
    return None
