"""The chat format: conversations as token ids, with a mask saying which tokens are trained.

A conversation is a JSON object (one line of a .jsonl file):

    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "reverse: lord"},
                  {"role": "assistant", "content": "drol"}],
     "lang": "en"}                                   (optional: a language tag)

and becomes one sequence of ids, each message between its role's start token and the
end-of-turn token:

    <en><|system|>Answer in one word.<|end|><|user|>reverse: lord<|end|><|assistant|>drol<|end|>
    .................................................................................^^^^^^^^^^^

Only the assistant's tokens and their end of turn are trained (^ above): the model
learns to answer and to stop, not to predict the user's questions, which it is always
given. Everything else gets the label ignore_index (-100) and no loss at all. The
`<|assistant|>` start token is not trained either: at inference it is part of the
prompt (`render_prompt`), and generation stops when the model emits `<|end|>`.

Special tokens. A BPE tokenizer registers the six texts of TOKEN_TEXT as special
tokens (`BPETokenizer.register_special_tokens`), ids after its vocabulary. A
CharTokenizer has no special-token mechanism: its vocabulary is characters, so each
special token is a character no text uses, from Unicode's private use area
(U+E000...). Either way a special token is one id that message content can never
produce: content that contains one is refused, so a user cannot forge a turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm.fileio import shorten
from tinylm.tokenizer import BPETokenizer, CharTokenizer

IGNORE_INDEX = -100  # SoftmaxCrossEntropy's ignore_index: no loss, no gradient
ROLES = ("system", "user", "assistant")
LANGS = ("en", "id")  # English, Indonesian: the language tags a conversation may carry
MAX_MESSAGES = 256

# The special tokens by name, and their text in a BPE vocabulary.
TOKEN_TEXT = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
              "end": "<|end|>", "en": "<en>", "id": "<id>"}
# Their character in a CharTokenizer's vocabulary (private use area: never in real text).
CHAR_TEXT = {name: chr(0xE000 + i) for i, name in enumerate(TOKEN_TEXT)}


@dataclass(frozen=True)
class ChatTokens:
    """The ids of the chat format's special tokens in one tokenizer (`chat_tokens`)."""

    system: int  # starts a system message
    user: int  # starts a user message
    assistant: int  # starts an assistant message; a prompt for generation ends with it
    end: int  # ends every message (end of turn); generation stops on it
    en: int  # language tag: English
    id: int  # language tag: Indonesian

    def role(self, role: str) -> int:
        return getattr(self, role)

    def lang(self, lang: str) -> int:
        return getattr(self, lang)

    def names(self) -> dict[int, str]:
        """{id: "<|user|>", ...}: how each special token is shown."""
        return {getattr(self, name): text for name, text in TOKEN_TEXT.items()}


def _texts(tokenizer) -> dict[str, str]:
    """{name: the special token's text in this tokenizer's vocabulary}."""
    if isinstance(tokenizer, CharTokenizer):
        return CHAR_TEXT
    if isinstance(tokenizer, BPETokenizer):
        return TOKEN_TEXT
    raise TypeError(f"the chat format needs a BPETokenizer or CharTokenizer, "
                    f"got {type(tokenizer).__name__}")


def _lookup(tokenizer, text: str) -> int | None:
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.stoi.get(text)
    return tokenizer.special_tokens.get(text)


def has_chat_tokens(tokenizer) -> bool:
    return all(_lookup(tokenizer, t) is not None for t in _texts(tokenizer).values())


def chat_tokens(tokenizer) -> ChatTokens:
    """The ids of the special tokens; a ValueError when the tokenizer lacks them."""
    texts = _texts(tokenizer)
    missing = [TOKEN_TEXT[n] for n, t in texts.items() if _lookup(tokenizer, t) is None]
    if missing:
        raise ValueError(f"the tokenizer has no chat tokens ({', '.join(missing)} missing): "
                         "it was not made for chat; fine-tune it with `tinylm finetune` first")
    return ChatTokens(**{name: _lookup(tokenizer, t) for name, t in texts.items()})


def add_chat_tokens(tokenizer):
    """A copy of `tokenizer` with the six special tokens added after its ids (those it
    has already keep theirs); the tokenizer given is unchanged. The model then needs
    that many more embedding rows: `tinylm.finetune.vocab.grow_vocab`."""
    texts = _texts(tokenizer)
    missing = [t for t in texts.values() if _lookup(tokenizer, t) is None]
    if isinstance(tokenizer, CharTokenizer):
        return CharTokenizer(tokenizer.chars + missing)
    copy = BPETokenizer.from_dict(tokenizer.to_dict(), trust_pattern=True)
    copy.register_special_tokens(missing)
    return copy


# ---------------------------------------------------------------------------
# Checking a conversation
# ---------------------------------------------------------------------------


def check_conversation(record: dict, where: str, *, need_assistant: bool = True):
    """(messages, lang) of a record {"messages": [...], "lang": ...}, checked; any
    other keys are the caller's (the bundled sets keep "task" and "answer" there).
    A problem is a ValueError starting with `where` (a "path:line") and the field."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: "messages" must be a non-empty list of '
                         f'{{"role", "content"}} objects, got {shorten(messages, 80)}')
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f'{where}: "messages" has {len(messages)} messages, more than '
                         f"{MAX_MESSAGES}")
    for i, m in enumerate(messages):
        field = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{field} must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f'{field}.role must be one of {", ".join(ROLES)}, got '
                             f'{shorten(m.get("role"), 40)}')
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{field}.content must be a string, got "
                             f"{type(m.get('content')).__name__}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"{field}: a system message may only come first")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message: nothing to train on")
    lang = record.get("lang")
    if lang is not None and lang not in LANGS:
        raise ValueError(f'{where}: "lang" must be one of {", ".join(LANGS)} or absent, '
                         f"got {shorten(lang, 40)}")
    return messages, lang


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """A conversation as ids, and which of them are trained."""

    ids: np.ndarray  # (n,) int64 token ids
    mask: np.ndarray  # (n,) bool: True for the assistant's tokens and their end of turn

    def labels(self) -> np.ndarray:
        """(n,) the ids where trained, IGNORE_INDEX elsewhere."""
        return np.where(self.mask, self.ids, IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.ids)


def encode_content(tokenizer, text: str, where: str) -> list[int]:
    """Message text as ordinary ids. Text that holds a special token's text is refused
    (a message must not forge a turn), as is text the tokenizer cannot encode."""
    for name, special in _texts(tokenizer).items():
        if special in text:
            raise ValueError(f"{where} contains the special token {TOKEN_TEXT[name]} "
                             f"({special!r}), which message text may not")
    try:
        if isinstance(tokenizer, BPETokenizer):
            return tokenizer.encode(text, allowed_special="none_raise")
        return tokenizer.encode(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def render_chat(messages, tokenizer, tokens: ChatTokens | None = None, *, lang=None,
                train_on: str = "assistant", where: str = "conversation") -> Rendered:
    """The ids of a conversation and its loss mask.

    `train_on`: "assistant" trains every assistant message (SFT); "last" only the
    last message, which must be the assistant's (a DPO response). `lang`: None, or a
    tag of LANGS put first. `where` starts error messages ("data.jsonl:12")."""
    if train_on not in ("assistant", "last"):
        raise ValueError(f"train_on must be 'assistant' or 'last', got {train_on!r}")
    tokens = tokens or chat_tokens(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    if lang is not None:
        ids.append(tokens.lang(lang))
        mask.append(False)
    last = len(messages) - 1
    for i, m in enumerate(messages):
        trained = m["role"] == "assistant" and (train_on == "assistant" or i == last)
        body = encode_content(tokenizer, m["content"], f"{where}: messages[{i}].content")
        ids += [tokens.role(m["role"]), *body, tokens.end]
        mask += [False] + [trained] * (len(body) + 1)  # the content and its end of turn
    if train_on == "last" and messages[last]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's")
    return Rendered(np.array(ids, dtype=np.int64), np.array(mask, dtype=bool))


def render_prompt(messages, tokenizer, tokens: ChatTokens | None = None, *, lang=None,
                  where: str = "prompt") -> np.ndarray:
    """(n,) ids that ask for the next assistant message: the conversation so far (which
    must end with a user message), then `<|assistant|>`. Generate from it and stop at
    `tokens.end`."""
    tokens = tokens or chat_tokens(tokenizer)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where}: a prompt must end with a user message")
    r = render_chat(messages, tokenizer, tokens, lang=lang, where=where)
    return np.concatenate([r.ids, [tokens.assistant]]).astype(np.int64)


def render_document(text: str, tokenizer, tokens: ChatTokens | None = None, *,
                    lang=None, where: str = "document") -> Rendered:
    """Plain text (pre-training style), optionally after a language tag; every token
    but the tag is trained. `generate --lang` starts a prompt with the same tag."""
    tokens = tokens or chat_tokens(tokenizer)
    body = encode_content(tokenizer, text, where)
    head = [] if lang is None else [tokens.lang(lang)]
    ids = np.array(head + body, dtype=np.int64)
    mask = np.ones(len(ids), dtype=bool)
    mask[: len(head)] = False
    return Rendered(ids, mask)


def decode_reply(tokenizer, tokens: ChatTokens, ids) -> str:
    """The text of generated ids, up to (not including) the first end of turn; any
    other special token ends it too (a model that has not learned to stop)."""
    specials = set(tokens.names())
    out = []
    for i in ids:
        if int(i) in specials:
            break
        out.append(int(i))
    return tokenizer.decode(out)
