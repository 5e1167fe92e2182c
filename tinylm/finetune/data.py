"""Fine-tuning batches: variable-length conversations as (x, y) rows of a fixed length T.

Pre-training cuts windows from one long stream of text (tinylm.data). A conversation
is a unit: cut in two, its answer would lose its question. So each row is made of
whole conversations, in one of two ways:

  padding (the default)   one conversation a row, its ids then pad ids; the labels of
                          the padding are IGNORE_INDEX. Attention is causal, so the
                          conversation never sees its padding (which comes after it):
                          a row computes exactly what the conversation alone would.
                          A batch is as long as its longest conversation (`pad_batch`).
  packing                 as many whole conversations as fit, one after the other, the
                          rest padded. Fewer wasted positions, but the attention has
                          no mask between conversations: a later one also sees the
                          earlier ones of its row. The loss never crosses a boundary:
                          a conversation starts with a role or language token, which
                          is never trained, so the target "first token of the next
                          conversation" is ignored.

With a sequence of ids s and labels l (l = s where trained, else IGNORE_INDEX):

    x = s[:-1]   y = l[1:]          (B, T) each: y[t] is the token after x[t], or ignored

Sampling (`ChatBatches`) draws conversations at random, with replacement, from its
own seeded generator: its whole state is that generator, as for pre-training's
`Batches`, so a resumed run draws the very batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from tinylm.fileio import FileFormatError

from .chat import IGNORE_INDEX, Rendered, chat_tokens, check_conversation, render_chat
from .jsonl import read_jsonl


def check_lengths(examples: list[Rendered], context_length: int, where: str = "data"):
    """(the examples that fit a row of context_length inputs, how many did not)."""
    fits = [e for e in examples if len(e) - 1 <= context_length]
    if not fits:
        raise ValueError(f"{where}: no example fits context_length={context_length} (the "
                         f"shortest has {min(len(e) for e in examples) - 1} inputs)")
    return fits, len(examples) - len(fits)


def pad_rows(examples: list[Rendered], T: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One example a row -> x, y (B, T) int64; x padded with pad_id, y with IGNORE_INDEX."""
    x = np.full((len(examples), T), pad_id, dtype=np.int64)
    y = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for row, e in enumerate(examples):
        n = len(e) - 1  # inputs: every token but the last
        if n > T:
            raise ValueError(f"an example of {n} inputs does not fit a row of {T}")
        x[row, :n] = e.ids[:-1]
        y[row, :n] = e.labels()[1:]
    return x, y


def pad_batch(examples: list[Rendered], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """pad_rows to the longest example of the batch rather than to the context: the
    same loss and gradients (the padding is ignored), fewer positions computed."""
    return pad_rows(examples, max(len(e) for e in examples) - 1, pad_id)


def pack_rows(examples: list[Rendered], T: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole examples, in order, into as few rows as fit -> x, y (rows, T) int64.
    A row holds T + 1 tokens (T inputs, T targets); an example starts a new row when
    it does not fit in what is left of the current one."""
    rows: list[list[Rendered]] = [[]]
    used = 0
    for e in examples:
        if len(e) > T + 1:
            raise ValueError(f"an example of {len(e) - 1} inputs does not fit a row of {T}")
        if used + len(e) > T + 1:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    joined = [Rendered(np.concatenate([e.ids for e in r]), np.concatenate([e.mask for e in r]))
              for r in rows]
    return pad_rows(joined, T, pad_id)


class ChatBatches:
    """Random batches of whole conversations: `next() -> (x, y)`, (B, T) int64 each.

    Padding: B conversations a batch. Packing: conversations are drawn until B rows
    of T are full (the draw that overflows the last row is kept for the next batch,
    so no drawn conversation is lost). Its state is the generator's and, when
    packing, the conversation carried over.
    """

    def __init__(self, examples: list[Rendered], context_length: int, batch_size: int,
                 pad_id: int, seed=0, pack: bool = False):
        if not examples:
            raise ValueError("no examples to draw batches from")
        if max(len(e) for e in examples) - 1 > context_length:
            raise ValueError(f"an example does not fit context_length={context_length}: "
                             "keep those that do with check_lengths first")
        self.examples = examples
        self.T, self.B, self.pad_id, self.pack = context_length, batch_size, pad_id, pack
        self.rng = np.random.default_rng(seed)
        self._carry: int | None = None  # packing: an example drawn but not yet placed

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.pack:
            picks = self.rng.integers(0, len(self.examples), size=self.B)
            return pad_batch([self.examples[i] for i in picks], self.pad_id)
        rows, used, chosen = 1, 0, []
        while True:
            i = self._carry if self._carry is not None else int(
                self.rng.integers(0, len(self.examples)))
            self._carry = None
            n = len(self.examples[i])
            if used + n > self.T + 1:
                if rows == self.B:
                    self._carry = i
                    break
                rows, used = rows + 1, 0
            chosen.append(i)
            used += n
        return pack_rows([self.examples[i] for i in chosen], self.T, self.pad_id)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "carry": self._carry}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._carry = state.get("carry")


def token_counts(x: np.ndarray, y: np.ndarray) -> dict:
    """How a batch uses its positions: all of them, and those with a trained target."""
    return {"positions": int(x.size), "trained": int((y != IGNORE_INDEX).sum())}


def load_chat(path, tokenizer, tokens=None, *, limit: int | None = None) -> list[Rendered]:
    """The conversations of a chat JSONL file, rendered with their loss masks. Errors
    are one line naming `path:line` and the field (tinylm.finetune.jsonl). `limit`:
    read at most this many records."""
    tokens = tokens or chat_tokens(tokenizer)
    out = []
    for lineno, record in read_jsonl(path, what="chat file"):
        where = f"{path}:{lineno}"
        try:
            messages, lang = check_conversation(record, where)
            out.append(render_chat(messages, tokenizer, tokens, lang=lang, where=where))
        except ValueError as exc:
            raise FileFormatError(str(exc)) from None
        if limit is not None and len(out) == limit:
            break
    return out
