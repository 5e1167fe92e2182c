"""Draw docs/img/precision_training.png from the log.jsonl of four `tinylm train` runs:
validation loss per evaluation (fp32, bf16, fp16, fp16 without loss scaling) and fp16's
loss scale per step, with the skipped steps marked.

    tinylm train --precision fp32 --out runs/fp32          # and bf16, fp16, then:
    tinylm train --precision fp16 --set loss_scaling=false --out runs/fp16-noscale
    python scripts/plot_precision.py runs                    # reads runs/{fp32,bf16,...}

Needs only matplotlib. See docs/precision.md, section 7.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = ("fp32", "bf16", "fp16", "fp16-noscale")
COLORS = dict(zip(RUNS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the directory holding the four run directories")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                        / "docs" / "img" / "precision_training.png")
    args = parser.parse_args()
    logs = {name: read_log(args.runs / name / "log.jsonl") for name in RUNS
            if (args.runs / name / "log.jsonl").is_file()}
    evals = {name: [r for r in log if r["event"] == "eval"] for name, log in logs.items()}
    fig, (ax, ax_diff, ax_scale) = plt.subplots(1, 3, figsize=(14, 3.8))
    ref = {r["step"]: r["val_loss"] for r in evals.get("fp32", [])}
    for name, ev in evals.items():
        steps = [r["step"] for r in ev]
        ax.plot(steps, [r["val_loss"] for r in ev], "o-", ms=3, label=name, color=COLORS[name])
        if name != "fp32" and ref:
            ax_diff.plot([s for s in steps if s in ref],
                         [r["val_loss"] - ref[r["step"]] for r in ev if r["step"] in ref],
                         "o-", ms=3, label=f"{name} - fp32", color=COLORS[name])
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", ylim=(None, 2.6),
           title="default preset, same seed and batches")
    ax_diff.axhline(0, color="gray", lw=0.8)
    ax_diff.set(xlabel="step", ylabel="difference (nats/token)",
                title="validation loss minus fp32's")
    for name, log in logs.items():
        steps = [r for r in log if r["event"] == "step" and "loss_scale" in r]
        if not steps:
            continue
        ax_scale.semilogy([r["step"] for r in steps], [r["loss_scale"] for r in steps],
                          base=2, lw=1.5, label=f"{name}: loss scale", color=COLORS[name])
        skipped = [r for r in steps if r["skipped"]]
        ax_scale.semilogy([r["step"] for r in skipped], [r["loss_scale"] for r in skipped],
                          "rx", base=2, label=f"skipped steps: {len(skipped)}")
    ax_scale.set(xlabel="step", ylabel="loss scale",
                 title="fp16's loss scale (growth interval 2000)")
    for a in (ax, ax_diff, ax_scale):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, metadata={"Software": None})


if __name__ == "__main__":
    main()
