"""Learning BPE merges: a simple reference trainer and a fast incremental one.

Both trainers see the training text the same way (`count_chunks`): pre-split into
chunks, each *distinct* chunk stored once with its count as a weight (" the" occurs
thousands of times in Shakespeare but is looked at once). Then, repeatedly:

1. find the most frequent adjacent pair of ids over all chunks, each pair counted once
   per occurrence times its chunk's weight;
2. give it the next new id (256, 257, ...) and `merge` it in every chunk.

TIE-BREAK: among equally frequent pairs the smallest pair (a, b) wins, comparing a
first, then b (`priority`). Any fixed rule would do; this one makes training
deterministic, independent of the order in which chunks or pairs are visited.

`train_simple` recounts every pair before each merge: easy to check, slow.
`train_fast` learns the same merges (the tests compare them) but keeps the pair counts
up to date incrementally: a merge only changes the chunks that contain the merged pair,
so only those are looked at again. Both are generators yielding one merge at a time,
`(pair, new_id, count)`, so a caller can show progress or stop early.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import pairwise

import regex

from .bpe import get_stats, merge, split_text


def count_chunks(text: str, pattern: str | None, special_tokens=()) -> Counter:
    """Pre-split `text` and count how often each distinct chunk occurs.

    Special-token text is cut out first, so no merge learns it.

    >>> dict(count_chunks("a cat, a cat", r" ?\\w+|\\S"))
    {'a': 1, ' cat': 2, ',': 1, ' a': 1}
    >>> dict(count_chunks("hi<|end|>hi", None, special_tokens=["<|end|>"]))
    {'hi': 2}
    """
    parts = [text]
    if special_tokens:
        parts = regex.split("|".join(regex.escape(s) for s in special_tokens), text)
    counts = Counter()
    for part in parts:
        chunks = split_text(part, pattern)
        if sum(map(len, chunks)) != len(part):
            raise ValueError(
                f"the split pattern {pattern!r} does not match every character of the "
                "training text; the unmatched text would be lost (add an alternative "
                "such as |\\s+|. at the end of the pattern)"
            )
        counts.update(chunks)
    return counts


def priority(pair: tuple[int, int], count: int) -> tuple:
    """Sort key for choosing the next merge; the smallest key wins.

    The most frequent pair wins; the TIE-BREAK among equally frequent pairs is the
    smallest pair (a, b). A min-heap of these keys pops the winner first.

    >>> candidates = {(5, 9): 3, (1, 2): 3, (0, 7): 1}
    >>> sorted(candidates, key=lambda p: priority(p, candidates[p]))
    [(1, 2), (5, 9), (0, 7)]
    """
    return (-count, pair)


def train_simple(chunks: list[list[int]], weights: list[int], num_merges: int) -> Iterator:
    """The reference trainer: recount every pair of every chunk before each merge.

    `chunks` are the distinct chunks as byte ids, `weights` how often each occurs.
    Yields `(pair, new_id, count)` per merge, new ids counting up from 256; stops early
    when no pair is left (every chunk is a single token).

    >>> list(train_simple([[1, 2, 3], [2, 3]], weights=[1, 2], num_merges=3))
    [((2, 3), 256, 3), ((1, 256), 257, 1)]
    """
    chunks = [list(ids) for ids in chunks]
    for new_id in range(256, 256 + num_merges):
        stats = {}
        for ids, weight in zip(chunks, weights, strict=True):
            get_stats(ids, stats, weight)
        if not stats:
            return
        pair = min(stats, key=lambda p: priority(p, stats[p]))
        yield pair, new_id, stats[pair]
        chunks = [merge(ids, pair, new_id) for ids in chunks]


def train_fast(chunks: list[list[int]], weights: list[int], num_merges: int) -> Iterator:
    """Same merges as `train_simple`, with pair counts updated incrementally.

    Three structures are kept in step with `chunks`:
      stats[pair]  the weighted count of `pair` over all chunks
      where[pair]  the indices of the chunks that contain `pair`
      heap         `priority(pair, count)` entries, to find the best pair quickly

    After a merge, only the chunks in `where[pair]` change. For each of them we take
    its old pairs out of the counts and its new pairs in (`get_stats` with a negative,
    then a positive weight); every other chunk's contribution stays valid. The heap is
    never searched: an entry whose count is out of date is skipped or refreshed when it
    reaches the top (`pop_best`, "lazy invalidation").

    >>> list(train_fast([[1, 2, 3], [2, 3]], weights=[1, 2], num_merges=3))
    [((2, 3), 256, 3), ((1, 256), 257, 1)]
    """
    chunks = [list(ids) for ids in chunks]
    stats = {}
    where = defaultdict(set)
    for i, (ids, weight) in enumerate(zip(chunks, weights, strict=True)):
        get_stats(ids, stats, weight)
        for pair in pairwise(ids):
            where[pair].add(i)
    heap = [priority(pair, count) for pair, count in stats.items()]
    heapq.heapify(heap)

    for new_id in range(256, 256 + num_merges):
        best = pop_best(heap, stats)
        if best is None:
            return  # no pair left
        pair, count = best
        yield pair, new_id, count

        changes = {}  # pair -> change of its weighted count caused by this merge
        for i in where.pop(pair):
            old = chunks[i]
            new = chunks[i] = merge(old, pair, new_id)
            get_stats(old, changes, -weights[i])
            get_stats(new, changes, weights[i])
            old_pairs, new_pairs = set(pairwise(old)), set(pairwise(new))
            for p in old_pairs - new_pairs:
                if p != pair:  # where[pair] is gone already: the pair never comes back
                    where[p].discard(i)
            for p in new_pairs - old_pairs:
                where[p].add(i)
        for p, change in changes.items():
            if change == 0:
                continue  # e.g. a pair in an untouched part of a changed chunk
            new_count = stats.get(p, 0) + change
            if new_count == 0:
                del stats[p]
            else:
                stats[p] = new_count
                if change > 0:  # a count that went down keeps its (now too high) entry
                    heapq.heappush(heap, priority(p, new_count))


def pop_best(heap: list, stats: dict) -> tuple[tuple[int, int], int] | None:
    """Pop the winning `(pair, count)` off the heap, skipping out-of-date entries.

    Every pair has an entry at least as high as its true count (counts that rise are
    pushed again; counts that fall leave a too-high entry behind). So when the top
    entry is up to date it is the true winner, tie-break included; when it is too high,
    we push the true count back and look again.

    >>> stats = {(1, 2): 3, (4, 5): 2}
    >>> heap = [priority((1, 2), 9), priority((4, 5), 2)]   # (1, 2) fell from 9 to 3
    >>> pop_best(heap, stats)
    ((1, 2), 3)
    """
    while heap:
        neg_count, pair = heapq.heappop(heap)
        count = stats.get(pair, 0)
        if count == -neg_count:
            return pair, count
        if count > 0:
            heapq.heappush(heap, priority(pair, count))
    return None


TRAINERS = {"fast": train_fast, "simple": train_simple}
