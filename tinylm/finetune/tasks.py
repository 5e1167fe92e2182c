"""The bundled instruction tasks: made by this code, scored by exact match.

A char-level model pre-trained on Tiny Shakespeare for a few minutes (~0.8M
parameters, 65 characters) is what fine-tuning starts from, so every task is one
such a model can learn in minutes on a CPU, and every prompt and answer uses only
Tiny Shakespeare's characters (it has one digit, "3": numbers are words):

    upper     "uppercase: lord"      -> "LORD"
    reverse   "reverse: lord"        -> "drol"
    repeat    "repeat twice: lord"   -> "lord lord"
    first     "first letter: lord"   -> "l"
    count     "count letters: lord"  -> "four"   (<id>: "empat")
    add       "two plus three"       -> "five"   (<id>: "lima")

The answers of `count` and `add` are in the language of the conversation's tag,
English (`<en>`) or Indonesian (`<id>`), with the very same prompt: the tag is
then the only way to know which answer is wanted. The other tasks carry `<en>`.

Held out. The words come from Tiny Shakespeare (lowercase, 3 to 6 letters, seen at
least 5 times, no palindromes, first letter unlike the last). The test set's words
are never in the training set, so its score measures the skill, not memory. `add`
has only 36 sums (0..5 plus 0..5) in two languages; the test set holds 12 of the
72 (sum, language) pairs, each of whose sums is in the training set in the other
language: it asks whether the tag, not the memorised answer, decides the language.

Sizes: 300 training and 40 test examples for each word task; `add` has 60 and 12.
Fewer are not enough: with 80 a task, a full fine-tune of the CPU preset's model
learned the training set perfectly and only 39% of the test set (it memorised the
80 words); with 300 a task the copying tasks carry over to new words (the scores
measured are in docs/finetuning.md).
Preferences (DPO) are built on the same examples: chosen = the right answer,
rejected = a plausible wrong one (the word unchanged, one letter off, the count
one off, the right number in the other language...).

`scripts/make_finetune_data.py` writes the files of tinylm/data/finetune/ with
`make_sets()`; the same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

TASKS = ("upper", "reverse", "repeat", "first", "count", "add")
NUMBERS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "id": ["nol", "satu", "dua", "tiga", "empat", "lima", "enam", "tujuh", "delapan",
           "sembilan", "sepuluh"],
}
ADD_MAX = 5  # add: both terms in 0..ADD_MAX, so sums 0..10 (NUMBERS' range)
SEED = 20240601
TRAIN_PER_TASK, TEST_PER_TASK = 300, 40
ADD_TEST = 12  # (a, b, lang) triples held out of `add`
TEST_WORDS = 150

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "finetune"
FILES = {"sft-train": "instructions_train.jsonl", "sft-test": "instructions_test.jsonl",
         "prefs-train": "prefs_train.jsonl", "prefs-test": "prefs_test.jsonl"}


def bundled(name: str) -> Path:
    """The path of a bundled set: sft-train, sft-test, prefs-train or prefs-test."""
    if name not in FILES:
        raise ValueError(f"no bundled set {name!r}; the sets are: {', '.join(FILES)}")
    return DATA_DIR / FILES[name]


def word_pool(text: str) -> list[str]:
    """Words for the tasks, sorted: see the module docstring for the rules."""
    counts = Counter(re.findall(r"\b[a-z]+\b", text))
    return sorted(w for w, n in counts.items()
                  if 3 <= len(w) <= 6 and n >= 5 and w != w[::-1] and w[0] != w[-1])


def prompt_and_answer(task: str, word: str = "", lang: str = "en", a: int = 0, b: int = 0):
    """(prompt, answer) of one example."""
    if task == "upper":
        return f"uppercase: {word}", word.upper()
    if task == "reverse":
        return f"reverse: {word}", word[::-1]
    if task == "repeat":
        return f"repeat twice: {word}", f"{word} {word}"
    if task == "first":
        return f"first letter: {word}", word[0]
    if task == "count":
        return f"count letters: {word}", NUMBERS[lang][len(word)]
    if task == "add":
        return f"{NUMBERS['en'][a]} plus {NUMBERS['en'][b]}", NUMBERS[lang][a + b]
    raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")


def wrong_answer(task: str, prompt: str, answer: str, lang: str, rng: random.Random) -> str:
    """A plausible wrong answer (never the right one), for the rejected reply."""
    word = prompt.split(": ")[-1]
    other = "id" if lang == "en" else "en"
    if task in ("count", "add"):
        n = NUMBERS[lang].index(answer)
        options = [NUMBERS[other][n]] + [NUMBERS[lang][m] for m in (n - 1, n + 1) if 0 <= m <= 10]
    elif task == "upper":
        options = [word, word.capitalize(), word[:-1].upper() + word[-1]]
    elif task == "reverse":
        options = [word, answer[1] + answer[0] + answer[2:]]  # the word, or two letters swapped
    elif task == "repeat":
        options = [word, f"{word} {word} {word}"]
    else:  # first
        options = [word[-1], word[1]]
    options = [o for o in options if o != answer]
    return rng.choice(options)


def record(task: str, prompt: str, answer: str, lang: str) -> dict:
    """One chat example: the conversation, its tag, and what the scorer needs."""
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}],
            "lang": lang, "task": task, "answer": answer}


def preference(example: dict, rng: random.Random) -> dict:
    """The preference record built on a chat example: its right answer is chosen."""
    prompt, answer = example["messages"][0]["content"], example["answer"]
    rejected = wrong_answer(example["task"], prompt, answer, example["lang"], rng)
    return {"messages": example["messages"][:1], "chosen": answer, "rejected": rejected,
            "lang": example["lang"], "task": example["task"]}


def make_sets(text: str, seed: int = SEED) -> dict[str, list[dict]]:
    """{"sft-train", "sft-test", "prefs-train", "prefs-test": records} from the
    training text `text` (Tiny Shakespeare); deterministic for a seed."""
    rng = random.Random(seed)
    words = word_pool(text)
    rng.shuffle(words)
    test_words, train_words = sorted(words[:TEST_WORDS]), sorted(words[TEST_WORDS:])
    train, test = [], []
    for task in TASKS[:-1]:
        for split, pool, n in ((train, train_words, TRAIN_PER_TASK),
                               (test, test_words, TEST_PER_TASK)):
            for word in rng.sample(pool, n):
                lang = rng.choice(("en", "id")) if task == "count" else "en"
                split.append(record(task, *prompt_and_answer(task, word, lang), lang))
    sums = [(a, b, lang) for a in range(ADD_MAX + 1) for b in range(ADD_MAX + 1)
            for lang in ("en", "id")]
    rng.shuffle(sums)
    held = []  # held-out triples whose (a, b) is kept in training in the other language
    for a, b, lang in sums:
        if len(held) < ADD_TEST and not any((a, b) == (x, y) for x, y, _ in held):
            held.append((a, b, lang))
    for a, b, lang in sums:
        split = test if (a, b, lang) in held else train
        split.append(record("add", *prompt_and_answer("add", lang=lang, a=a, b=b), lang))
    rng.shuffle(train)
    rng.shuffle(test)
    return {"sft-train": train, "sft-test": test,
            "prefs-train": [preference(e, rng) for e in train],
            "prefs-test": [preference(e, rng) for e in test]}


def is_correct(example: dict, reply: str) -> bool:
    """The checker: the reply, without surrounding whitespace, is the answer exactly."""
    return reply.strip() == example["answer"]


def score(examples: list[dict], replies: list[str]) -> dict:
    """{"accuracy": fraction right, "per_task": {task: fraction}, "n": count}."""
    right: Counter = Counter()
    seen: Counter = Counter()
    for example, reply in zip(examples, replies, strict=True):
        seen[example["task"]] += 1
        right[example["task"]] += is_correct(example, reply)
    total = sum(seen.values())
    return {"accuracy": sum(right.values()) / total if total else float("nan"), "n": total,
            "per_task": {t: right[t] / seen[t] for t in TASKS if seen[t]}}
