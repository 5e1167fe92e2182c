"""See where the token boundaries fall: coloured text for a terminal or a notebook.

    view = show_tokens(tok, "To be, or not to be")
    print(view)        # a terminal: ANSI background colours, one per token in turn
    view               # a notebook: the same as HTML (hover a token to see its id)

Works with any tokenizer that has `encode` and `decode_bytes` (BPE and char).
"""

from __future__ import annotations

import html

# background colours used in turn, as (256-colour ANSI code, HTML colour)
COLOURS = [(153, "#c6dbef"), (223, "#fdd9b5"), (194, "#c7e9c0"), (225, "#f2d0e8"),
           (230, "#f7f4b8"), (189, "#d9d3f0")]


def token_pieces(tokenizer, ids) -> list[str]:
    """The text of each token on its own; bytes that are only part of a character
    are shown as escapes like \\xc3.

    >>> from tinylm.tokenizer import BPETokenizer
    >>> tok = BPETokenizer()          # no merges: one token per byte
    >>> token_pieces(tok, tok.encode("hé"))
    ['h', '\\\\xc3', '\\\\xa9']
    """
    return [tokenizer.decode_bytes([idx]).decode("utf-8", errors="backslashreplace")
            for idx in ids]


class TokenView:
    """Token ids with their pieces of text; prints in colour, shows as HTML in notebooks."""

    def __init__(self, ids: list[int], pieces: list[str]):
        self.ids = ids
        self.pieces = pieces

    def ansi(self) -> str:
        """The text with each token on an alternating background colour (ANSI codes)."""
        return "".join(f"\x1b[30;48;5;{COLOURS[i % len(COLOURS)][0]}m{piece}\x1b[0m"
                       for i, piece in enumerate(self.pieces))

    def html(self) -> str:
        """The text as HTML spans, alternating colours; each span's title is its id."""
        spans = "".join(
            f'<span style="background:{COLOURS[i % len(COLOURS)][1]}" title="id {idx}">'
            f"{html.escape(piece)}</span>"
            for i, (idx, piece) in enumerate(zip(self.ids, self.pieces, strict=True))
        )
        return f'<pre style="white-space:pre-wrap; color:#000">{spans}</pre>'

    def _repr_html_(self) -> str:  # Jupyter displays this
        return self.html()

    def __str__(self) -> str:
        return self.ansi()

    def __repr__(self) -> str:
        return f"TokenView({len(self.ids)} tokens)"


def show_tokens(tokenizer, text: str, **encode_kwargs) -> TokenView:
    """Encode `text` and return a `TokenView` of its tokens; `encode_kwargs` go to
    `tokenizer.encode`, e.g. `allowed_special="all"`.

    >>> from tinylm.tokenizer import BPETokenizer
    >>> show_tokens(BPETokenizer(), "hi").pieces
    ['h', 'i']
    """
    ids = tokenizer.encode(text, **encode_kwargs)
    return TokenView(ids, token_pieces(tokenizer, ids))
