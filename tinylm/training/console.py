"""What `tinylm train` prints: the configuration, a progress bar, the evaluations
and the result. (The Trainer itself prints nothing; it tells a reporter.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tinylm.training.config import TrainConfig, field_names


def format_config(config: TrainConfig, overridden: set[str]) -> str:
    """Every field, one a line; `*` marks those in `overridden`."""
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
            self._start(info)
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
            self._interrupted(info)
        elif event == "end":
            self.close()

    def _start(self, info: dict) -> None:
        resumed = f", resuming at step {info['step']}" if info["resumed_from"] else ""
        self.print(f"model: {info['params']:,} parameters on {info['device']}; "
                   f"data: {info['train_tokens']:,} train + {info['val_tokens']:,} "
                   f"validation tokens, {info['tokenizer']}{resumed}")
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=info["max_iters"], initial=min(info["step"], info["max_iters"]),
                            unit="step", dynamic_ncols=True, smoothing=0.05)

    def _interrupted(self, info: dict) -> None:
        self.close()
        signal = info.get("signal", "SIGINT")
        what = "interrupted" if signal == "SIGINT" else f"stopped by {signal}"
        if info["path"]:
            self.print(f"{what}: saved the state after step {info['step']} to "
                       f"{info['path']}; continue with: tinylm train --resume "
                       f"{Path(info['path']).parent}")
        else:
            self.print(f"{what} mid-update: the last checkpoint (step {info['step']}) "
                       "is kept")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_result(r: dict) -> None:
    """The final numbers and where the checkpoints, the log and the plot are."""
    minutes, seconds = divmod(r["elapsed_s"], 60)
    if r["val_loss"] is not None:
        print(f"done: step {r['step']}, val loss {r['val_loss']:.4f}, val perplexity "
              f"{r['val_ppl']:.2f} (train loss {r['train_loss']:.4f}); best val loss "
              f"{r['best_val_loss']:.4f}; training time {int(minutes)}m{seconds:04.1f}s")
    print(f"checkpoints: {r['best_checkpoint']} (best), {r['last_checkpoint']} (last); "
          f"log {r['log']}; plot {r['plot']}")
