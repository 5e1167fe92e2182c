"""Asking a fine-tuned model: greedy replies to chat prompts, scored against the answers.

    examples = read_examples(bundled("sft-test"))
    result = evaluate_tasks(model, tokenizer, examples)   # {"accuracy", "per_task", ...}

A reply is generated greedily (temperature 0: the model's single most likely answer,
so a score does not depend on a seed) after `render_prompt`, and ends at the first
end-of-turn token. Prompts of the same length go through the model together.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from tinylm.fileio import FileFormatError
from tinylm.sampling import generate

from .chat import chat_tokens, check_conversation, decode_reply, render_prompt
from .jsonl import read_jsonl
from .tasks import score

MAX_NEW_TOKENS = 24  # the longest bundled answer ("repeat twice" of 6 letters) is 13


def read_examples(path) -> list[dict]:
    """The records of a scored chat file: each has "messages" (the last one the
    assistant's), "task" and "answer"; errors name `path:line`."""
    out = []
    for lineno, record in read_jsonl(path, what="chat file"):
        where = f"{path}:{lineno}"
        try:
            messages, _lang = check_conversation(record, where)
        except ValueError as exc:
            raise FileFormatError(str(exc)) from None
        if messages[-1]["role"] != "assistant" or not isinstance(record.get("answer"), str) \
                or not isinstance(record.get("task"), str):
            raise FileFormatError(f'{where}: a scored example needs "task", "answer" and an '
                                  "assistant message last")
        out.append(record)
    return out


def replies(model, tokenizer, prompts: list[tuple[list, str | None]], *,
            max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 64) -> list[str]:
    """The greedy reply to each (messages ending with a user message, lang) prompt."""
    tokens = chat_tokens(tokenizer)
    ids = [render_prompt(m, tokenizer, tokens, lang=lang) for m, lang in prompts]
    by_length = defaultdict(list)  # same length: one (B, T) array, no padding needed
    for i, p in enumerate(ids):
        by_length[len(p)].append(i)
    out = [""] * len(ids)
    for n, rows in by_length.items():
        new = min(max_new_tokens, model.config.context_length - n)
        if new < 1:  # the prompt fills the context: no room for a reply
            continue
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            idx = np.stack([ids[i] for i in chunk])  # (B, n)
            seqs = generate(model, idx, new, temperature=0, eos_id=tokens.end)
            for i, seq in zip(chunk, np.asarray(seqs), strict=True):
                out[i] = decode_reply(tokenizer, tokens, seq[n:])
    return out


def evaluate_tasks(model, tokenizer, examples: list[dict], **options) -> dict:
    """Score the model's replies to scored examples (tasks.score), with the replies."""
    prompts = [(e["messages"][:-1], e.get("lang")) for e in examples]
    answers = replies(model, tokenizer, prompts, **options)
    return {**score(examples, answers), "replies": answers}
