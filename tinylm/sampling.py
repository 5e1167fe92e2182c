"""Generation: turning a model's next-token logits into text.

A language model gives, at every step, logits (B, V) for the next token. This
file turns them into tokens, one step at a time:

    SamplingSettings(...)            the knobs of that pipeline, checked once per call
    filter_logits(logits, ...)       the per-step pipeline below, as a pure function
    next_token_probs(logits, ...)    the distribution it samples from (plot it in a notebook)
    sample_next(logits, rng, ...)    one token per row
    stream(model, idx, n, ...)       an iterator: each step's new tokens (B,), as they come
    generate(model, idx, n, ...)     all steps at once -> ids (B, T + new)
    beam_search(model, idx, n, ...)  deterministic search for a high-probability continuation
    Decoder(model, B, use_cache)     next-token logits of a growing sequence (KV cache or not)

The pipeline of one sampling step, in this order (Hugging Face's order too):

    logits (B, V)
      -> repetition penalty   CTRL rule, for tokens already in the sequence
      -> temperature          logits / temperature; temperature 0 means greedy (argmax)
      -> top-k                keep the k highest logits
      -> top-p                keep the smallest most-probable set whose mass reaches p
      -> min-p                keep tokens with probability >= min_p * (the top probability)
      -> renormalise (softmax over what is left) -> sample

Where things run: the model runs on its device (NumPy or CuPy); the last
position's logits (B, V) are copied to the host and filtered and sampled there
in float64 with a seeded NumPy Generator. That copy is small, and it makes a
seed give the same tokens on the CPU and on a GPU (given the same logits).

The KV cache (tinylm/nn/kv_cache.py) makes each new token cost O(T) instead of
a forward pass over the whole window; `Decoder` below decides when it can be
used and when it must be rebuilt (the window slides past the context).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tinylm.backend import to_device, to_numpy, xp_of
from tinylm.nn.functional import log_softmax, softmax
from tinylm.nn.kv_cache import KVCache
from tinylm.nn.linear import check_ids

# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """How one sampling step turns logits into a token: the knobs of `filter_logits`.

    Made once per call of a public function (from its keyword arguments) and checked
    then, so a bad value fails at the call, not at the first step; the steps pass this
    one object along instead of five arguments. Frozen: a generation cannot change
    its settings half-way.
    """

    temperature: float = 1.0  # logits / temperature: < 1 sharper, > 1 flatter, 0 greedy
    top_k: int | None = None  # keep the k highest logits (None: all)
    top_p: float | None = None  # nucleus sampling (Holtzman et al. 2020), in (0, 1]
    min_p: float | None = None  # keep p >= min_p * p_max (Nguyen et al. 2024), in [0, 1]
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): > 1 discourages repeats

    def __post_init__(self):
        check_temperature(self.temperature)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.min_p is not None and (not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1] or None, got {self.min_p!r}")
        penalty = self.repetition_penalty
        if not _is_real(penalty) or not MIN_TEMPERATURE <= penalty <= 1 / MIN_TEMPERATURE:
            raise ValueError(f"repetition_penalty must be a number in [{MIN_TEMPERATURE:g}, "
                             f"{1 / MIN_TEMPERATURE:g}] (1 = off), got {penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Dividing logits by a temperature near 0 overflows them to infinity (1e-320 does,
# for any logit above ~1e-12), and inf - inf in the softmax is NaN: every
# probability NaN. Below 1e-6 sampling is greedy to within rounding anyway, so such
# a temperature is refused: 0 asks for greedy decoding. (A repetition penalty divides
# or multiplies logits the same way, so it is kept within [1e-6, 1e6].)
MIN_TEMPERATURE = 1e-6


def check_temperature(temperature, name: str = "temperature") -> None:
    """0 (greedy) or a finite number >= MIN_TEMPERATURE; else ValueError naming `name`."""
    if not _is_real(temperature) or not (
            temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"{name} must be 0 (greedy) or a finite number >= "
                         f"{MIN_TEMPERATURE:g}, got {temperature!r}")


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------
# One step: filter the logits, then sample (pure functions on host arrays)
# ---------------------------------------------------------------------------


def apply_repetition_penalty(logits, prev_ids, penalty: float) -> np.ndarray:
    """The CTRL rule (Keskar et al. 2019, section 4.1, as Hugging Face applies it).

    logits (B, V), prev_ids (B, n) ints -> a new (B, V) float64 array where every
    token that occurs in its row of prev_ids has its logit divided by `penalty`
    when positive and multiplied by it when negative: either way, with penalty > 1,
    less likely. (Dividing a negative logit would make it *more* likely; that is
    why the two signs differ.) A token counts once however often it occurred.

    >>> apply_repetition_penalty(np.array([[2.0, -1.0, 3.0]]), np.array([[0, 1, 1]]), 2.0)
    array([[ 1., -2.,  3.]])
    """
    out = np.array(to_numpy(logits), dtype=np.float64)  # (B, V) copy
    if penalty == 1.0 or prev_ids is None or np.size(prev_ids) == 0:
        return out
    B, V = out.shape
    seen = np.zeros((B, V), dtype=bool)  # (B, V) True where the token already occurred
    seen[np.arange(B)[:, None], np.asarray(prev_ids)] = True
    penalised = np.where(out > 0, out / penalty, out * penalty)  # (B, V)
    return np.where(seen, penalised, out)


def filter_logits(logits, prev_ids=None, **settings) -> np.ndarray:
    """The per-step pipeline: logits (V,) or (B, V) -> float64 logits of the same
    shape on the host, where removed tokens are -inf. Softmax of the result is the
    distribution `sample_next` draws from. `prev_ids` (B, n) (or (n,)) are the
    tokens already in each sequence, for the repetition penalty. The keywords are
    SamplingSettings's: temperature=1.0, top_k=None, top_p=None, min_p=None,
    repetition_penalty=1.0.

    Top-k keeps every logit >= the k-th largest, so ties with the k-th are all
    kept (as nanoGPT and Hugging Face do). Top-p keeps the smallest set of most
    probable tokens whose mass is >= top_p (ties broken by token id), always at
    least the top token. Temperature 0 keeps only the argmax (the first one on ties).
    """
    return _filter(logits, prev_ids, SamplingSettings(**settings))


def _filter(logits, prev_ids, settings: SamplingSettings) -> np.ndarray:
    x = np.asarray(to_numpy(logits), dtype=np.float64)
    one_row = x.ndim == 1
    if one_row:
        x = x[None]  # (1, V)
        prev_ids = None if prev_ids is None else np.asarray(prev_ids)[None]
    if x.ndim != 2:
        raise ValueError(f"logits must have shape (V,) or (B, V), got {x.shape}")
    B, V = x.shape

    # 1. repetition penalty (on the raw logits, before temperature: CTRL's order)
    x = apply_repetition_penalty(x, prev_ids, settings.repetition_penalty)  # (B, V) new array
    # 2. temperature
    if settings.greedy:
        best = x.argmax(axis=-1)  # (B,)
        keep = np.zeros((B, V), dtype=bool)
        keep[np.arange(B), best] = True
        x = np.where(keep, x, -np.inf)
        return x[0] if one_row else x
    x /= settings.temperature
    # 3. top-k: everything below the k-th largest logit goes
    if settings.top_k is not None and settings.top_k < V:
        kth = np.partition(x, V - settings.top_k, axis=-1)[:, V - settings.top_k, None]  # (B, 1)
        x[x < kth] = -np.inf
    # 4. top-p (nucleus): sort by probability, keep a token while the mass of
    #    the tokens before it is still below p (so the kept set just reaches p)
    if settings.top_p is not None and settings.top_p < 1.0:
        probs = softmax(x)  # (B, V)
        order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V) most probable first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)  # (B, V)
        mass_before = np.zeros_like(sorted_probs)  # (B, V) exclusive cumsum; 0 for the first
        np.cumsum(sorted_probs[:, :-1], axis=-1, out=mass_before[:, 1:])
        drop_sorted = mass_before >= settings.top_p  # (B, V); the first token has mass 0 before it
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)  # back to token order
        x[drop] = -np.inf
    # 5. min-p: a threshold relative to the top probability, so it adapts to how
    #    confident the model is (a flat distribution keeps many tokens, a peaked one few)
    if settings.min_p is not None and settings.min_p > 0.0:
        probs = softmax(x)  # (B, V)
        x[probs < settings.min_p * probs.max(axis=-1, keepdims=True)] = -np.inf
    return x[0] if one_row else x


def next_token_probs(logits, prev_ids=None, **settings) -> np.ndarray:
    """The distribution a sampling step draws from: softmax(filter_logits(...)),
    (V,) or (B, V) float64, zero for removed tokens. Same keywords as filter_logits."""
    return softmax(filter_logits(logits, prev_ids, **settings))


def sample_next(logits, rng: np.random.Generator, prev_ids=None, **settings) -> np.ndarray:
    """Draw one token per row: logits (B, V) -> ids (B,) int64 on the host
    (or (V,) -> a 0-d array). `rng` is a NumPy Generator; the keywords are
    filter_logits's. Greedy (temperature 0) takes the argmax and draws nothing.

    Sampling is by inverse CDF: u ~ uniform(0, 1], the token is the first whose
    cumulative probability reaches u. A removed token adds 0 to the CDF, so it
    is never chosen (u > 0 rules out the edge case of a removed first token).
    """
    return _sample(logits, rng, prev_ids, SamplingSettings(**settings))


def _sample(logits, rng, prev_ids, settings: SamplingSettings) -> np.ndarray:
    x = _filter(logits, prev_ids, settings)
    one_row = x.ndim == 1
    x = x[None] if one_row else x  # (B, V)
    if settings.greedy:
        ids = x.argmax(axis=-1)  # (B,) only the argmax survived the filter
    else:
        cdf = np.cumsum(softmax(x), axis=-1)  # (B, V)
        u = 1.0 - rng.random(x.shape[0])  # (B,) in (0, 1]
        # count the tokens whose CDF is still below u * total (total ~ 1, exactly
        # cdf[:, -1], so u = 1 can never run past the last token)
        ids = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=-1)  # (B,)
    ids = ids.astype(np.int64)
    return ids[0] if one_row else ids


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


def check_token_id(token, vocab_size: int, name: str) -> None:
    """One token id given as a setting (eos_id, the CLI's --eos-id): an int in
    [0, vocab_size), or an error that says which setting. (Arrays of ids: check_ids.)"""
    if not _is_int(token) or not 0 <= token < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {token!r}")


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
