"""The run directory, and the guard that makes Ctrl-C stop at a step boundary.

    out_dir/last/      checkpoint to resume from (see tinylm/checkpoint.py)
    out_dir/best/      checkpoint with the lowest validation loss so far
    out_dir/log.jsonl  one JSON record per step, evaluation and event
    out_dir/loss.png   train and validation loss curves
    out_dir/tokens.npy the tokenized text (memory-mapped; tinylm/data.py writes it)

The Trainer decides what to write and when; this module knows where and how:
the log is appended a line at a time (a crash tears at most the last line, which
`read_log` skips), the plot and a rewritten log replace the old file atomically.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from tinylm import checkpoint
from tinylm.fileio import atomic_write, write_text


class RunDir:
    """The paths of a run directory, its log and its plot."""

    def __init__(self, path):
        self.path = Path(path)
        self.last_dir, self.best_dir = self.path / "last", self.path / "best"
        self.log_path, self.plot_path = self.path / "log.jsonl", self.path / "loss.png"

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
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        plot_log(self.log_path, self.plot_path, title=str(self.path))


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


class DeferredInterrupt:
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
