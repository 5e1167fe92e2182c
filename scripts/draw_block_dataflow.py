"""Draw docs/img/block_dataflow.png: the data flow of one tinylm Block (pre-norm, GPT-2).

Forward (blue, solid) runs left to right along the residual stream; each branch
(ln1 -> attn, ln2 -> mlp) forks off it and is added back. Backward (red, dashed)
runs right to left: at each `+` the incoming gradient is passed unchanged to both
inputs, and at each fork the gradient of the straight path and the branch's
gradient add. The code the picture shows is `Block.forward` and `Block.backward`
in tinylm/nn/block.py.

    python scripts/draw_block_dataflow.py            # writes docs/img/block_dataflow.png

Needs only matplotlib (the notebooks' extra). The output is deterministic for a
given matplotlib version (no timestamps in the PNG metadata).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch  # noqa: E402

FWD = "#1f4e9c"  # forward: blue
BWD = "#c0392b"  # backward: red
BOX = "#eef3fb"
BOX_MLP = "#eef8ee"
NORM = "#f6f1e4"

OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "block_dataflow.png"

# layout (data coordinates)
Y_S = 0.0  # residual stream, forward
Y_SB = -0.55  # residual stream, backward
Y_B = 2.9  # branch, forward
Y_BB = 2.35  # branch, backward
X_IN, X_F1, X_P1, X_F2, X_P2, X_OUT = 0.3, 1.6, 7.3, 8.6, 13.4, 14.9


def arrow(ax, p, q, color, dashed=False, lw=1.8, head=12):
    ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=head, lw=lw,
                                 color=color, linestyle=(0, (4, 2.5)) if dashed else "-",
                                 shrinkA=0, shrinkB=0, zorder=3))


def line(ax, xs, ys, color, dashed=False, lw=1.8):
    ax.plot(xs, ys, color=color, lw=lw, ls=(0, (4, 2.5)) if dashed else "-", zorder=3,
            solid_capstyle="butt")


def box(ax, x0, x1, y0, y1, title, body, face, title_size=12):
    ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0,
                                boxstyle="round,pad=0.02,rounding_size=0.12",
                                fc=face, ec="0.35", lw=1.2, zorder=2))
    cx = (x0 + x1) / 2
    ax.text(cx, y1 - 0.12, title, ha="center", va="top", fontsize=title_size,
            weight="bold", family="monospace", zorder=4)
    if body:
        ax.text(cx, y1 - 0.52, body, ha="center", va="top", fontsize=8.6, zorder=4,
                family="monospace", linespacing=1.45)


def plus(ax, x, y, r=0.25):
    ax.add_patch(Circle((x, y), r, fc="white", ec="k", lw=1.4, zorder=5))
    ax.text(x, y - 0.01, "+", ha="center", va="center", fontsize=15, weight="bold", zorder=6)


def fork_dot(ax, x, y):
    ax.add_patch(Circle((x, y), 0.09, fc="k", ec="k", zorder=5))


def half(ax, x_fork, x_norm0, x_norm1, x_op0, x_op1, x_plus, norm, op, op_body, face,
         labels):
    """One residual half: fork at x_fork, norm box, op box, `+` at x_plus."""
    yb0, yb1 = Y_BB - 0.75, Y_B + 0.95  # box extent, covers both branch lanes
    # forward: up from the fork, through norm and op, down into the +
    line(ax, [x_fork, x_fork], [Y_S, Y_B], FWD)
    arrow(ax, (x_fork, Y_B), (x_norm0, Y_B), FWD)
    arrow(ax, (x_norm1, Y_B), (x_op0, Y_B), FWD)
    line(ax, [x_op1, x_plus - 0.12], [Y_B, Y_B], FWD)
    arrow(ax, (x_plus - 0.12, Y_B), (x_plus - 0.12, Y_S + 0.22), FWD)
    # forward straight path
    arrow(ax, (x_fork, Y_S), (x_plus - 0.25, Y_S), FWD, lw=2.6)
    # backward: the + copies its gradient into the branch (up, then right to left)
    line(ax, [x_plus + 0.12, x_plus + 0.12], [Y_SB + 0.32, Y_BB], BWD, dashed=True)
    arrow(ax, (x_plus + 0.12, Y_BB), (x_op1, Y_BB), BWD, dashed=True)
    arrow(ax, (x_op0, Y_BB), (x_norm1, Y_BB), BWD, dashed=True)
    line(ax, [x_norm0, x_fork + 0.2], [Y_BB, Y_BB], BWD, dashed=True)
    arrow(ax, (x_fork + 0.2, Y_BB), (x_fork + 0.2, Y_SB + 0.25), BWD, dashed=True)
    # backward straight path: unchanged
    arrow(ax, (x_plus - 0.25, Y_SB), (x_fork + 0.45, Y_SB), BWD, dashed=True, lw=2.6)
    box(ax, x_norm0, x_norm1, yb0, yb1, norm, "(B,T,C)\n->\n(B,T,C)", NORM)
    box(ax, x_op0, x_op1, yb0, yb1, op, op_body, face)
    fork_dot(ax, x_fork, Y_S)
    plus(ax, x_plus, Y_S)
    plus(ax, x_fork + 0.2, Y_SB, r=0.22)  # where the two gradients add
    f_in, f_out, f_straight, b_branch, b_straight = labels
    ax.text((x_norm1 + x_op0) / 2, Y_B + 0.12, f_in, color=FWD, fontsize=8, ha="center",
            va="bottom")
    ax.text(x_op1 + 0.1, Y_B + 0.12, f_out, color=FWD, fontsize=8.5, ha="left", va="bottom")
    ax.text((x_fork + x_plus) / 2, Y_S + 0.12, f_straight, color=FWD,
            fontsize=9, ha="center", va="bottom")
    ax.text((x_fork + x_plus) / 2, Y_SB - 0.14, b_straight, color=BWD, fontsize=9,
            ha="center", va="top")
    ax.text(x_plus + 0.22, (Y_S + Y_BB) / 2 + 0.35, b_branch, color=BWD, fontsize=8.5,
            ha="left", va="center", rotation=90)


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(15.5, 7.6))
    ax.set_xlim(-0.2, 16.3)
    ax.set_ylim(-3.55, 4.85)
    ax.set_aspect("equal")
    ax.axis("off")

    attn_body = ("qkv:  (B,T,3C)\n"
                 "q,k,v: (B,H,T,hs)\n"
                 "att = softmax(\n  q k^T/sqrt(hs) + mask)\n"
                 "      (B,H,T,T)\n"
                 "att v -> (B,T,C), proj")
    mlp_body = ("fc:   (B,T,4C)\n"
                "GELU: (B,T,4C)\n"
                "proj: (B,T,C)")
    half(ax, X_F1, 2.2, 3.3, 4.0, 6.75, X_P1, "ln1", "attn", attn_body, BOX,
         ("ln1(x)", "(B,T,C)", "straight path: x, unchanged", "dh goes to both",
          "straight path: dh, unchanged"))
    half(ax, X_F2, 9.2, 10.3, 11.0, 12.8, X_P2, "ln2", "mlp", mlp_body, BOX_MLP,
         ("ln2(h)", "(B,T,C)", "straight path: h, unchanged", "dout goes to both",
          "straight path: dout, unchanged"))
    # the stream between the halves and at the ends
    arrow(ax, (X_IN + 0.75, Y_S), (X_F1, Y_S), FWD, lw=2.6)
    arrow(ax, (X_P1 + 0.25, Y_S), (X_F2, Y_S), FWD, lw=2.6)
    arrow(ax, (X_P2 + 0.25, Y_S), (X_OUT - 0.1, Y_S), FWD, lw=2.6)
    arrow(ax, (X_OUT - 0.1, Y_SB), (X_P2 + 0.12, Y_SB), BWD, dashed=True, lw=2.6)
    line(ax, [X_P2 + 0.12, X_P2 + 0.12], [Y_SB, Y_SB + 0.32], BWD, dashed=True)
    arrow(ax, (X_F2 - 0.02, Y_SB), (X_P1 + 0.12, Y_SB), BWD, dashed=True, lw=2.6)
    line(ax, [X_P1 + 0.12, X_P1 + 0.12], [Y_SB, Y_SB + 0.32], BWD, dashed=True)
    arrow(ax, (X_F1 - 0.02, Y_SB), (X_IN + 0.75, Y_SB), BWD, dashed=True, lw=2.6)

    # the ends and the shapes on the stream
    ax.text(X_IN + 0.3, Y_S + 0.05, "x\n(B,T,C)", ha="center", va="bottom", fontsize=11,
            weight="bold")
    ax.text(X_IN + 0.3, Y_SB - 0.1, "dx\n(B,T,C)", ha="center", va="top", fontsize=11,
            weight="bold", color=BWD)
    ax.text(X_OUT + 0.3, Y_S + 0.05, "out\n(B,T,C)", ha="center", va="bottom", fontsize=11,
            weight="bold")
    ax.text(X_OUT + 0.3, Y_SB - 0.1, "dout\n(B,T,C)", ha="center", va="top", fontsize=11,
            weight="bold", color=BWD)
    ax.text((X_P1 + X_F2) / 2, Y_S + 0.12, "h\n(B,T,C)", ha="center", va="bottom",
            fontsize=10, weight="bold")
    ax.text((X_P1 + X_F2) / 2, Y_SB - 0.14, "dh", ha="center", va="top", fontsize=10,
            weight="bold", color=BWD)

    # the two update rules, forward and backward
    ax.text(0.0, 4.75, "forward (Block.forward):", color=FWD, fontsize=11, weight="bold",
            va="top")
    ax.text(4.1, 4.72, "h = x + attn(ln1(x))      out = h + mlp(ln2(h))", color=FWD,
            fontsize=10.5, family="monospace", va="top")
    ax.text(0.0, -1.55, "backward (Block.backward): at each fork the two gradients add",
            color=BWD, fontsize=11, weight="bold", va="top")
    ax.text(0.0, -1.98,
            "dh = dout + ln2.backward(mlp.backward(dout))    "
            "# straight path + branch, at the fork before ln2\n"
            "dx = dh   + ln1.backward(attn.backward(dh))     "
            "# straight path + branch, at the fork before ln1",
            color=BWD, fontsize=10, family="monospace", va="top", linespacing=1.45)
    ax.text(0.0, -3.05,
            "B batch, T positions, C = d_model, H heads, hs = C/H.   "
            "Solid blue: forward.   Dashed red: backward.   "
            "\u25cf fork (a value used twice)   \u2295 sum",
            fontsize=9.5, color="0.25", va="top")
    ax.set_title("One tinylm Block (pre-norm, GPT-2): shapes, forward and backward",
                 fontsize=14, weight="bold", loc="left", x=0.0, y=0.985)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"PNG to write (default {OUT})")
    print("wrote", draw(parser.parse_args().out))


if __name__ == "__main__":
    main()
