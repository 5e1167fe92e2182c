"""See the loss mask: which tokens of a rendered conversation are trained, in colour.

    view = show_mask(rendered, tokenizer)
    print(view)        # a terminal: trained tokens on green, the rest on grey (ANSI)
    view               # a notebook: the same as HTML (hover a token for its id and label)

Special tokens are shown by name in bold (`<|user|>`), also those of a char tokenizer,
whose vocabulary holds them as private-use characters that no font draws.
"""

from __future__ import annotations

import html

from tinylm.tokenizer import token_pieces

from .chat import IGNORE_INDEX, Rendered, chat_tokens

# (256-colour ANSI background, HTML background) for trained and for ignored tokens
TRAINED = (157, "#b7e4b0")
IGNORED = (252, "#e0e0e0")


class MaskView:
    """Tokens with their text and mask; prints in colour, shows as HTML in notebooks."""

    def __init__(self, ids: list[int], pieces: list[str], mask: list[bool],
                 special: list[bool]):
        self.ids, self.pieces, self.mask, self.special = ids, pieces, mask, special

    def ansi(self) -> str:
        out = []
        for piece, trained, special in zip(self.pieces, self.mask, self.special, strict=True):
            colour = (TRAINED if trained else IGNORED)[0]
            bold = "1;" if special else ""
            out.append(f"\x1b[{bold}30;48;5;{colour}m{piece}\x1b[0m")
            if special and piece == "<|end|>":
                out.append("\n")  # one message a line: easier to read
        return "".join(out)

    def html(self) -> str:
        spans = []
        for idx, piece, trained, special in zip(self.ids, self.pieces, self.mask, self.special,
                                                strict=True):
            colour = (TRAINED if trained else IGNORED)[1]
            label = idx if trained else IGNORE_INDEX
            weight = "font-weight:bold;" if special else ""
            spans.append(f'<span style="background:{colour};{weight}" '
                         f'title="id {idx}, label {label}">{html.escape(piece)}</span>')
            if special and piece == "<|end|>":
                spans.append("<br>")
        legend = (f'<span style="background:{TRAINED[1]}">trained</span> '
                  f'<span style="background:{IGNORED[1]}">ignored (label {IGNORE_INDEX})</span>')
        return (f'<div style="font-family:monospace; color:#000">{"".join(spans)}'
                f'<div style="margin-top:4px; font-size:smaller">{legend}</div></div>')

    def _repr_html_(self) -> str:  # Jupyter displays this
        return self.html()

    def __str__(self) -> str:
        return self.ansi()

    def __repr__(self) -> str:
        return f"MaskView({len(self.ids)} tokens, {sum(self.mask)} trained)"


def show_mask(rendered: Rendered, tokenizer, tokens=None) -> MaskView:
    """A MaskView of a rendered conversation (`render_chat`)."""
    names = (tokens or chat_tokens(tokenizer)).names()
    ids = [int(i) for i in rendered.ids]
    pieces = [names.get(i) or token_pieces(tokenizer, [i])[0] for i in ids]
    return MaskView(ids, pieces, [bool(m) for m in rendered.mask], [i in names for i in ids])
