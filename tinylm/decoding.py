"""Decoding: running the model, step after step, to turn a prompt into a continuation.

    stream(model, idx, n, ...)       an iterator: each step's new tokens (B,), as they come
    generate(model, idx, n, ...)     all steps at once -> ids (B, T + new)
    beam_search(model, idx, n, ...)  deterministic search for a high-probability continuation
    Decoder(model, B, use_cache)     next-token logits of a growing sequence (KV cache or not)

One step's logits become a token in tinylm/sampling.py (`SamplingSettings`, the
filter pipeline, `sample_next`); this module feeds the model and loops. It is
separate so that each file stays short; tinylm.sampling re-exports its public names,
so `from tinylm.sampling import generate` (or `Decoder`, `beam_search`, ...) still works.

The KV cache (tinylm/nn/kv_cache.py) makes each new token cost O(T) instead of
a forward pass over the whole window; `Decoder` below decides when it can be
used and when it must be rebuilt (the window slides past the context).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np

from tinylm.backend import to_device, to_numpy, xp_of
from tinylm.nn.functional import log_softmax
from tinylm.nn.kv_cache import KVCache
from tinylm.nn.linear import check_ids
from tinylm.sampling import SamplingSettings, _is_int, _is_real, _sample, check_token_id

# ---------------------------------------------------------------------------
# Feeding the model: with or without the KV cache
# ---------------------------------------------------------------------------


class Decoder:
    """Gives the next-token logits (B, V) for a growing host sequence (B, n).

    Without a cache: a full forward over the last context_length tokens each step.
    (Call it with the model in eval mode, as generate and beam_search do.)
    With the cache, while the sequence fits in the context (n <= T), only the
    tokens the cache lacks are run (the whole prompt once, then one token a step).

    Past the context (n > T) the window slides: the model sees tokens n-T..n-1
    at positions 0..T-1, so every token's *position* changes at every step. With
    learned absolute position embeddings that changes every hidden state in every
    layer, and no cached key or value stays valid. The exact thing to do, and what
    this does by default, is to rebuild the cache from the whole window each step (a
    prefill of T tokens): the logits then equal those of a forward over the last T
    tokens (up to rounding), but such a step costs as much as the uncached one.

    With pos="rope" or "none" attention sees positions only through offsets, so a
    key need not change when the window slides, and a *rolling* cache
    (tinylm/nn/kv_cache.py) drops the oldest position and decodes on at O(T) a
    token. That is exact only for keys that depend on no token which has left the
    window: layer 0's. Deeper layers' cached keys were computed while older tokens
    were still in view, so they differ from the cropped forward's. The Decoder
    therefore rolls by default (`rolling=None`) only where every key that matters is
    exact (one layer, or a sliding window W with n_layers * (W - 1) < T:
    `rolling_is_exact`); `rolling=True` rolls anyway, trading exactness past the
    context for speed (the model then sees more than T tokens' worth of context
    through its deeper keys); `rolling=False` always re-prefills.
    """

    def __init__(self, model, batch_size: int, use_cache: bool, rolling: bool | None = None):
        self.model = model
        self.T = model.config.context_length  # the window
        auto = rolling is None and rolling_is_exact(model.config)
        self.rolling = bool(use_cache and (rolling or auto))
        self.cache = (KVCache.for_model(model, batch_size, rolling=self.rolling)
                      if use_cache else None)
        self.fed = 0  # rolling: tokens of the sequence consumed (or skipped) so far

    def next_logits(self, seq: np.ndarray) -> np.ndarray:
        """seq (B, n) host int64 -> logits for token n+1, (B, V) float64 on the host."""
        T, n = self.T, seq.shape[1]
        cache = self.cache
        if cache is None:
            logits = self.model.forward(seq[:, -T:])[:, -1]  # crop to the context; (B, V)
            self.model.clear_backward_caches()  # generation never runs backward
        elif not self.rolling:
            if n > T or cache.pos >= n:
                # the window slid (or the caller rewound): no cached key is valid
                cache.reset()
            logits = self.model.forward_cached(seq[:, max(n - T, 0) + cache.pos:], cache)  # (B, V)
        else:
            if self.fed >= n:  # the caller rewound
                cache.reset()
                self.fed = 0
            if self.fed == 0:
                self.fed = max(n - T, 0)  # a long prompt: prefill its last T tokens
            new = seq[:, self.fed:]  # (B, t)
            if cache.pos + new.shape[1] <= T:
                logits = self.model.forward_cached(new, cache)  # fits: one call
            else:
                for j in range(new.shape[1]):  # past the context: one token at a time
                    logits = self.model.forward_cached(new[:, j:j + 1], cache)
        self.fed = n
        return to_numpy(logits).astype(np.float64)

    def reorder(self, rows) -> None:
        """Beam search: row i continues from row rows[i]."""
        if self.cache is not None:
            self.cache.reorder(rows)


def rolling_is_exact(config) -> bool:
    """Whether a rolling KV cache gives the logits of the cropped forward (up to
    rounding) for this GPTConfig: positions seen only through offsets (pos="rope" or
    "none"), and no cached key depending on a token outside the window: a single layer,
    or a sliding window W whose receptive field n_layers * (W - 1) stays below T."""
    if config.pos not in ("rope", "none"):
        return False
    W = config.sliding_window
    T, L = config.context_length, config.n_layers
    return L == 1 or (W is not None and L * (W - 1) < T)


@contextlib.contextmanager
def _eval_mode(model):
    """Run the model in eval mode (no dropout) and put back the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _prompt(model, idx, max_new_tokens, eos_id, who: str) -> np.ndarray:
    """Check what every generating function is given; the prompt idx (B, T) token ids
    (list, NumPy or device array) -> a host int64 copy. `who` names the caller."""
    ids = np.array(to_numpy(idx) if not isinstance(idx, list) else idx)  # copy on the host
    if ids.ndim != 2:
        raise ValueError(f"idx must be a (B, T) array of token ids (use [ids] for one sequence), "
                         f"got shape {ids.shape}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"idx must hold at least one token per row, got shape {ids.shape}")
    check_ids(ids, model.config.vocab_size, who)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if eos_id is not None:
        check_token_id(eos_id, model.config.vocab_size, "eos_id")
    return ids.astype(np.int64)


def _check_rolling(model, rolling) -> None:
    """rolling=True needs positions seen only through offsets: say so at the call."""
    if rolling and model.config.pos not in ("rope", "none"):
        raise ValueError(f"rolling=True needs a model with pos='rope' or pos='none', not "
                         f"pos={model.config.pos!r}")



def _seeded_or_fresh_rng(seed) -> np.random.Generator:
    """The sampler's Generator: seeded by an int; a Generator is used as it is (to
    continue its stream); None means fresh OS entropy, so each call samples
    differently. (Unlike weight initialisation, where no seed means seed 0.)"""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Sampling: stream and generate
# ---------------------------------------------------------------------------


def stream(model, idx, max_new_tokens: int, *, temperature=1.0, top_k=None, top_p=None,
           min_p=None, repetition_penalty=1.0, eos_id=None, seed=None,
           use_cache=True, rolling=None) -> Iterator[np.ndarray]:
    """Generate token by token: yields each step's new tokens, (B,) int64 NumPy.

    Arguments as `generate` (which collects this). The arguments are checked
    when `stream` is called; the model runs as the iterator is advanced, in eval
    mode; its previous mode comes back when the iterator is exhausted or closed.
    """
    settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
    prompt = _prompt(model, idx, max_new_tokens, eos_id, "stream")
    _check_rolling(model, rolling)
    return _stream(model, prompt, max_new_tokens, settings, eos_id, _seeded_or_fresh_rng(seed),
                   use_cache, rolling)


def _stream(model, seq, max_new_tokens, settings: SamplingSettings, eos_id, rng, use_cache,
            rolling=None):
    B = seq.shape[0]
    finished = np.zeros(B, dtype=bool)  # (B,) rows that have produced eos_id
    with _eval_mode(model):
        decoder = Decoder(model, B, use_cache, rolling)
        for _ in range(max_new_tokens):
            logits = decoder.next_logits(seq)  # (B, V)
            # the penalty looks at the whole sequence, also tokens cropped from the window
            nxt = _sample(logits, rng, seq, settings)  # (B,)
            if eos_id is not None:
                nxt[finished] = eos_id  # a finished row is padded with eos_id
                finished |= nxt == eos_id
            seq = np.concatenate([seq, nxt[:, None]], axis=1)  # (B, n+1)
            yield nxt
            if finished.all():
                break


def generate(model, idx, max_new_tokens: int, *, temperature=1.0, top_k=None, top_p=None,
             min_p=None, repetition_penalty=1.0, eos_id=None, seed=None, use_cache=True,
             rolling=None):
    """Sample a continuation of each row of idx (B, T) -> ids (B, T + new).

    Each step runs the pipeline of `filter_logits` on the last position's logits
    (repetition penalty -> temperature -> top-k -> top-p -> min-p -> renormalise)
    and samples; `temperature=0` is greedy decoding. `seed` (an int, or a NumPy
    Generator to continue) makes the result reproducible, the same on CPU and GPU.

    Prompts longer than the model's context keep their last context_length
    tokens in view (the output still starts with the whole prompt). With
    `use_cache=True` a KV cache makes each token cost O(T) while the sequence
    fits in the context, with the same logits as recomputing from scratch. Past
    the context it is rebuilt from the window every step (exact), or, with
    pos="rope"/"none", rolls on at O(T) a token: `rolling=None` (the default) rolls
    where that is exact, `rolling=True` everywhere (then approximate past the context
    in deeper layers), `rolling=False` never (see `Decoder`).

    `eos_id`: a row that samples it is finished; its later positions are filled
    with eos_id, so the array stays rectangular. Generation stops early when
    every row has finished, so `new` is max_new_tokens, or fewer only then.
    The result is NumPy, or on the device when idx was a device array.
    """
    settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
    prompt = _prompt(model, idx, max_new_tokens, eos_id, "generate")
    _check_rolling(model, rolling)
    steps = list(_stream(model, prompt, max_new_tokens, settings, eos_id,
                         _seeded_or_fresh_rng(seed), use_cache, rolling))
    out = np.concatenate([prompt] + [s[:, None] for s in steps], axis=1)  # (B, T + new)
    return to_device(out, xp_of(idx))


# ---------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------


def beam_search(model, idx, max_new_tokens: int, beam_width: int = 4, length_penalty: float = 1.0,
                eos_id=None, *, use_cache=True, rolling=None, return_scores=False):
    """Keep the `beam_width` best partial continuations at every step; return the
    best finished one for each row of idx (B, T) -> ids (B, T + n).

    A hypothesis's score is Hugging Face's (`BeamHypotheses.add`):

        score = sum of log p(token) over its generated tokens / n ** length_penalty

    n is the number of generated tokens, eos included. length_penalty = 0 ranks
    by total log-probability (which favours short outputs), 1 by the average per
    token; > 1 favours longer outputs further. (GNMT's ((5 + n) / 6) ** alpha,
    Wu et al. 2016, is a different normaliser; tinylm uses Hugging Face's.)

    Each step extends every live beam by every token and keeps the best
    candidates; a candidate ending in eos_id (among the top beam_width) becomes
    a finished hypothesis and frees its slot. A row stops once no live beam can
    still beat its best finished hypothesis (a bound, so the stop is exact: the
    result is that of Hugging Face's early_stopping="never"); at max_new_tokens
    the live beams are scored as they are. Shorter results are padded with
    eos_id. beam_width=1 is greedy decoding (with an eos_id, when length_penalty
    <= 0; a positive one may prefer a longer hypothesis to greedy's early eos).
    A wider beam usually, not always, finds a better-scoring result: beam search
    is not monotone in the width. Deterministic; runs in eval mode.
    With return_scores=True, also returns the best scores (B,) float64.
    `use_cache` and `rolling` are generate's.
    """
    prompt = _prompt(model, idx, max_new_tokens, eos_id, "beam_search")
    _check_rolling(model, rolling)
    if not _is_int(beam_width) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
    if not _is_real(length_penalty) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    B, T = prompt.shape
    W = beam_width
    with _eval_mode(model):
        best = _beam_search(model, prompt, max_new_tokens, W, float(length_penalty), eos_id,
                            use_cache, rolling)
    n_max = max(len(tokens) for _, tokens in best)
    out = np.full((B, T + n_max), 0 if eos_id is None else eos_id, dtype=np.int64)
    out[:, :T] = prompt
    for b, (_, tokens) in enumerate(best):
        out[b, T:T + len(tokens)] = tokens
    out = to_device(out, xp_of(idx))
    scores = np.array([score for score, _ in best])  # (B,)
    return (out, scores) if return_scores else out


def _beam_search(model, prompt, max_new_tokens, W, length_penalty, eos_id, use_cache,
                 rolling=None):
    """The search itself -> per prompt row, (score, generated tokens) of the best hypothesis."""
    B, T = prompt.shape
    seqs = np.repeat(prompt, W, axis=0)  # (B*W, T): row b*W + j is beam j of prompt b
    # Only beam 0 is live at first: W identical beams would fill the beam with copies
    scores = np.full((B, W), -np.inf)  # (B, W) sum of log-probs of each beam's tokens
    scores[:, 0] = 0.0
    finished = [[] for _ in range(B)]  # per row: (score, tokens) of finished hypotheses
    done = np.zeros(B, dtype=bool)
    decoder = Decoder(model, B * W, use_cache, rolling)

    def score(sum_logp, n):
        return sum_logp / n**length_penalty

    for step in range(max_new_tokens):
        n = step + 1  # generated tokens after this step
        logp = log_softmax(decoder.next_logits(seqs))  # (B*W, V)
        V = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(B, W * V)  # (B, W*V) each beam x token
        # 2W best candidates: at most W of them end in eos (one per beam), so
        # at least W live ones remain. Stable sort: ties go to the lower index.
        top = np.argsort(-cand, axis=-1, kind="stable")[:, :2 * W]  # (B, 2W)
        rows = np.zeros((B, W), dtype=np.int64)  # (B, W) parent beam of each new beam
        tokens = np.full((B, W), 0 if eos_id is None else eos_id, dtype=np.int64)  # (B, W)
        new_scores = np.full((B, W), -np.inf)  # (B, W)
        for b in range(B):
            if done[b]:
                continue  # its beams stay -inf and are never extended usefully
            live = 0
            for rank, c in enumerate(top[b]):
                s = cand[b, c]
                if s == -np.inf or live == W:
                    break
                beam, token = divmod(int(c), V)
                if token == eos_id:
                    if rank < W:  # only an eos among the top W counts (Hugging Face)
                        generated = np.append(seqs[b * W + beam, T:], eos_id)
                        finished[b].append((score(s, n), generated))
                    continue
                rows[b, live], tokens[b, live], new_scores[b, live] = beam, token, s
                live += 1
            # Stop the row when no live beam can beat its best finished hypothesis.
            # Log-probs are <= 0, so a live sum s can only fall; its score is
            # s / n'**lp for some later length n' in (n, max_new_tokens]:
            # at most s / max_new_tokens**lp when lp > 0, at most s / n**lp otherwise.
            if finished[b]:
                s_live = new_scores[b].max()
                bound = score(s_live, max_new_tokens if length_penalty > 0 else n)
                if max(f[0] for f in finished[b]) >= bound:
                    done[b] = True
        parents = (np.arange(B)[:, None] * W + rows).reshape(-1)  # (B*W,) rows of seqs
        seqs = np.concatenate([seqs[parents], tokens.reshape(-1, 1)], axis=1)  # (B*W, T+n)
        decoder.reorder(parents)
        scores = new_scores
        if done.all():
            break

    best = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # ran out of steps: the live beams are hypotheses as they stand
            n = seqs.shape[1] - T
            for j in range(W):
                if scores[b, j] > -np.inf:
                    hyps.append((score(scores[b, j], n) if n else 0.0, seqs[b * W + j, T:]))
        # max keeps the first of equal scores: the earliest finished, or the better beam
        best.append(max(hyps, key=lambda h: h[0]))
    return best
