"""Generation: turning a model's next-token logits into text.

A language model gives, at every step, logits (B, V) for the next token. This
file turns them into tokens, one step at a time:

    SamplingSettings(...)            the knobs of that pipeline, checked once per call
    filter_logits(logits, ...)       the per-step pipeline below, as a pure function
    next_token_probs(logits, ...)    the distribution it samples from (plot it in a notebook)
    sample_next(logits, rng, ...)    one token per row
    check_token_id(id, V, name)      a token id given as a setting (eos_id), checked

The loops that run the model and call these (`stream`, `generate`, `beam_search`,
`Decoder`, `rolling_is_exact`) are in tinylm/decoding.py; they are re-exported
here, so `from tinylm.sampling import generate` works as it always has.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinylm.backend import to_numpy
from tinylm.nn.functional import softmax

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


def check_token_id(token, vocab_size: int, name: str) -> None:
    """One token id given as a setting (eos_id, the CLI's --eos-id): an int in
    [0, vocab_size), or an error that says which setting. (Arrays of ids: check_ids.)"""
    if not _is_int(token) or not 0 <= token < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {token!r}")


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


# The decoding loops, re-exported: they import this module's pieces (SamplingSettings,
# _sample, check_token_id), so they are imported last, once those exist. (tinylm's
# __init__ imports this module first, so it is always the one that starts the cycle.)
from tinylm.decoding import (  # noqa: E402, F401
    Decoder,
    beam_search,
    generate,
    rolling_is_exact,
    stream,
)
