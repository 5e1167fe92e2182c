"""Sampling: each filter's distribution, generate/stream, beam search, `tinylm generate`.

The statistical tests build each filtered distribution of a toy logits vector
by hand (the kept set is worked out in the comments), draw 50,000 tokens with a
fixed seed through the public `sample_next`, and compare the frequencies: a
standard error of at most 0.0023 per token, so 0.01 is over 4 of them, and a
filtered-out token must never appear.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import get_xp, to_device, to_numpy, xp_of
from tinylm.cli import main
from tinylm.generate_cli import text_pieces
from tinylm.sampling import (
    MIN_TEMPERATURE,
    SamplingSettings,
    apply_repetition_penalty,
    beam_search,
    filter_logits,
    generate,
    next_token_probs,
    sample_next,
    stream,
)
from tinylm.tokenizer import BPETokenizer, CharTokenizer

# token:           0    1    2    3     4     5     6    7
LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
# softmax(LOGITS), most probable first:
#   token 0: .4046, 7: .2454, 1: .1488, 2: .0903, 3: .0548, 4: .0332, 5: .0201, 6: .0027
N_DRAWS = 50_000


def by_hand(logits, keep):
    """softmax over the tokens in `keep`, zero elsewhere."""
    p = np.zeros(len(logits))
    keep = sorted(keep)
    p[keep] = np.exp(logits[keep])
    return p / p.sum()


def check(expected, prev_ids=None, seed=0, **settings):
    """Draw N_DRAWS tokens for LOGITS through sample_next (one batched call) and
    compare the frequencies with `expected`; next_token_probs must give it exactly."""
    logits = np.tile(LOGITS, (N_DRAWS, 1))  # (N, V)
    prev = None if prev_ids is None else np.tile(prev_ids, (N_DRAWS, 1))  # (N, n)
    ids = sample_next(logits, np.random.default_rng(seed), prev, **settings)  # (N,)
    assert ids.shape == (N_DRAWS,) and ids.dtype == np.int64
    freq = np.bincount(ids, minlength=len(LOGITS)) / N_DRAWS
    assert np.all(freq[expected == 0] == 0), "a filtered-out token was sampled"
    assert np.abs(freq - expected).max() < 0.01, (freq, expected)
    np.testing.assert_allclose(next_token_probs(LOGITS, prev_ids, **settings), expected,
                               rtol=1e-12, atol=1e-15)


def test_plain_sampling_follows_softmax():
    check(by_hand(LOGITS, range(8)))


def test_temperature():
    for T in (0.5, 2.0):
        check(by_hand(LOGITS / T, range(8)), temperature=T)


def test_top_k():
    # the three largest logits: 2.0 (token 0), 1.5 (7), 1.0 (1)
    check(by_hand(LOGITS, {0, 7, 1}), top_k=3)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    # cumulative mass before each token: 0: 0, 7: .4046, 1: .6500, 2: .7988, 3: .8891.
    # Token 2 is needed to reach 0.8 (.7988 + .0903); token 3 is not.
    check(by_hand(LOGITS, {0, 7, 1, 2}), top_p=0.8)
    # 0.3 is reached by the top token alone
    check(by_hand(LOGITS, {0}), top_p=0.3)


def test_min_p():
    # threshold 0.1 * .4046 = .0405: token 3 (.0548) stays, token 4 (.0332) goes
    check(by_hand(LOGITS, {0, 7, 1, 2, 3}), min_p=0.1)


def test_repetition_penalty_ctrl_rule():
    # tokens 0, 4 and 6 occurred (4 twice: penalised once): 2.0 / 2 = 1.0,
    # -0.5 * 2 = -1.0, -3.0 * 2 = -6.0
    penalised = LOGITS.copy()
    penalised[[0, 4, 6]] = [1.0, -1.0, -6.0]
    check(by_hand(penalised, range(8)), prev_ids=np.array([0, 4, 4, 6]), repetition_penalty=2.0)


def test_pipeline_order():
    """penalty 2 on token 0 -> temperature 0.5 -> top-k 4 -> top-p 0.9 -> min-p 0.3.

    After the penalty and temperature the logits are [2, 2, 1, 0, -1, -2, -6, 3].
    top-k 4 keeps tokens 7, 0, 1, 2 (logits 3, 2, 2, 1): probabilities .5345,
    .1966, .1966, .0723, mass before token 2 is .9277 >= 0.9, so top-p drops it.
    (Top-p before top-k would have kept token 2: over all 8 tokens the mass
    before it is .892.) min-p 0.3 of .576 is .173: tokens 0 and 1 (.212) stay.
    """
    scaled = np.array([2.0, 2.0, 1.0, 0.0, -1.0, -2.0, -6.0, 3.0])
    check(by_hand(scaled, {7, 0, 1}), prev_ids=np.array([0]), repetition_penalty=2.0,
          temperature=0.5, top_k=4, top_p=0.9, min_p=0.3)


def test_greedy_is_the_argmax_after_the_penalty():
    assert sample_next(LOGITS, np.random.default_rng(0), temperature=0) == 0
    # the penalty runs first: token 0 drops to 1.0 (tied with 1), token 7 (1.5) wins
    assert sample_next(LOGITS, None, np.array([0]), temperature=0, repetition_penalty=2.0) == 7
    # ties go to the first token
    assert sample_next(np.array([1.0, 3.0, 3.0]), None, temperature=0) == 1
    probs = next_token_probs(LOGITS, temperature=0)
    np.testing.assert_array_equal(probs, np.eye(8)[0])


def test_filter_logits_is_pure_and_marks_removed_tokens_with_minus_inf():
    logits = LOGITS.copy()
    out = filter_logits(logits, top_k=2)
    np.testing.assert_array_equal(logits, LOGITS)  # input untouched
    assert np.isneginf(out).sum() == 6 and out[0] == 2.0 and out[7] == 1.5
    # top-k keeps every logit tied with the k-th (nanoGPT, Hugging Face)
    assert np.isfinite(filter_logits(np.array([1.0, 2.0, 2.0, 0.0]), top_k=1)).sum() == 2
    batch = filter_logits(np.stack([LOGITS, -LOGITS]), top_k=1)  # (B, V) row by row
    assert np.argmax(batch[0]) == 0 and np.argmax(batch[1]) == 6
    probs = next_token_probs(np.stack([LOGITS, LOGITS]), top_p=0.5, min_p=0.05)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0)
    np.testing.assert_array_equal(
        apply_repetition_penalty(np.array([[2.0, -1.0, 3.0]]), np.array([[0, 1, 1]]), 2.0),
        [[1.0, -2.0, 3.0]])


@pytest.mark.parametrize("bad", [
    dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=1e-320),
    dict(temperature=float("inf")), dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0),
    dict(top_p=1.5), dict(top_p=float("nan")), dict(min_p=-0.1), dict(min_p=float("nan")),
    dict(repetition_penalty=0.0), dict(repetition_penalty=1e-320),
    dict(repetition_penalty=float("inf")),
])
def test_bad_settings_are_errors(bad):
    with pytest.raises(ValueError):
        SamplingSettings(**bad)
    with pytest.raises(ValueError):
        filter_logits(LOGITS, **bad)


def test_the_smallest_temperature_still_gives_probabilities():
    """1e-320 would overflow the logits to inf and the softmax to NaN; the smallest
    temperature allowed gives greedy's answer, as finite probabilities."""
    probs = next_token_probs(LOGITS * 1e3, temperature=MIN_TEMPERATURE)
    assert np.isfinite(probs).all() and probs.argmax() == LOGITS.argmax()
    assert probs.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# generate and stream on a tiny model
# ---------------------------------------------------------------------------

CFG = GPTConfig(vocab_size=29, context_length=8, d_model=16, n_layers=2, n_heads=2)


def tiny_model(device="cpu", dtype="float64", seed=0, scale=6.0):
    model = GPT(CFG, seed=seed, device=device, dtype=dtype)
    # sharper than GPT-2's init (whose logits are nearly uniform), so greedy,
    # beams and filters make real choices
    model.load_state_dict({k: v * (1.0 if "ln" in k else scale)
                           for k, v in model.state_dict().items()})
    return model


def prompts(B=2, T=3, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(B, T))


def test_generate_smoke(device):
    model = tiny_model(device, dtype="float32")
    prompt = prompts()
    out = generate(model, prompt, 10, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05,
                   repetition_penalty=1.2, seed=0)
    assert isinstance(out, np.ndarray) and out.shape == (2, 13) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, :3], prompt)
    assert out.min() >= 0 and out.max() < CFG.vocab_size
    # a device prompt gives a device result, with the same tokens
    on_device = generate(model, to_device(prompt, model.xp), 10, temperature=0.8, top_k=5,
                         top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=0)
    assert xp_of(on_device) is model.xp
    np.testing.assert_array_equal(to_numpy(on_device), out)
    assert model.training  # the mode it was in


def test_seed_gives_the_same_tokens_on_every_backend(device):
    ref = generate(tiny_model("cpu"), prompts(), 12, seed=7)
    out = generate(tiny_model(device), prompts(), 12, seed=7)
    np.testing.assert_array_equal(out, ref)
    assert not np.array_equal(generate(tiny_model("cpu"), prompts(), 12, seed=8), ref)
    # a Generator continues its stream: two calls differ, a fresh one repeats them
    rng = np.random.default_rng(7)
    first = generate(tiny_model(), prompts(), 12, seed=rng)
    np.testing.assert_array_equal(first, ref)
    assert not np.array_equal(generate(tiny_model(), prompts(), 12, seed=rng), ref)


def test_prompt_longer_than_context_keeps_its_last_tokens():
    model = tiny_model()
    long_prompt = prompts(2, 13, seed=1)
    out = generate(model, long_prompt, 5, temperature=0)
    np.testing.assert_array_equal(out[:, :13], long_prompt)  # the whole prompt comes back
    cropped = generate(model, long_prompt[:, -CFG.context_length:], 5, temperature=0)
    np.testing.assert_array_equal(out[:, 13:], cropped[:, CFG.context_length:])


def test_rows_stop_at_eos_and_are_padded():
    model = tiny_model()
    prompt = prompts(2, 3, seed=2)
    free = generate(model, prompt, 8, seed=0)
    # eos: a token row 0 samples (not first) and row 1 never does
    new0, new1 = list(free[0, 3:]), list(free[1, 3:])
    first = next(i for i, t in enumerate(new0) if i > 0 and t not in new0[:i] and t not in new1)
    eos = int(new0[first])
    first += 3
    # the same seed: each step draws one number per row, finished or not, so
    # the rows sample exactly what they sampled without eos_id
    out = generate(model, prompt, 8, seed=0, eos_id=eos)
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
    assert np.all(out[0, first:] == eos)  # padded with eos_id
    np.testing.assert_array_equal(out[1], free[1])  # the other row is unaffected
    # when every row has finished, generation stops early
    solo_free = generate(model, prompt[:1], 8, seed=0)
    eos = int(solo_free[0, 4])
    stop = 3 + list(solo_free[0, 3:]).index(eos)
    solo = generate(model, prompt[:1], 8, seed=0, eos_id=eos)
    assert solo.shape == (1, stop + 1) and solo[0, -1] == eos


def test_stream_yields_each_step_and_restores_the_mode_when_closed():
    model = tiny_model().train()
    it = stream(model, prompts(), 6, temperature=0)
    assert model.training  # nothing runs before the first step
    step = next(it)
    assert step.shape == (2,) and not model.training
    it.close()
    assert model.training
    steps = list(stream(model, prompts(), 6, temperature=0))
    np.testing.assert_array_equal(np.stack(steps, axis=1),
                                  generate(model, prompts(), 6, temperature=0)[:, 3:])
    with pytest.raises(ValueError, match="top_p"):
        stream(model, prompts(), 6, top_p=2.0)  # checked at the call, not at the first step


@pytest.mark.parametrize("bad, match", [
    (dict(idx=[1, 2, 3]), r"\(B, T\)"), (dict(idx=[[]]), "at least one token"),
    (dict(idx=[[1, 99]]), r"\[0, 29\)"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(eos_id=29), "eos_id"),
])
def test_bad_generate_arguments(bad, match):
    kwargs = dict(idx=[[1, 2]], max_new_tokens=3) | bad
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), kwargs.pop("idx"), kwargs.pop("max_new_tokens"), **kwargs)


def test_prompt_ids_go_through_the_shared_check_and_no_seed_is_fresh_entropy():
    """Regression for the merged helpers: prompt ids are checked by nn.linear.check_ids
    (naming the caller and the position), eos_id by check_token_id; seed=None draws
    from fresh entropy (it is not seed 0, as it is for weight initialisation)."""
    model = tiny_model()
    with pytest.raises(ValueError, match=r"beam_search: token id 29 at position \(1, 0\)"):
        beam_search(model, [[1], [29]], 2)
    with pytest.raises(TypeError, match="generate expects integer token ids"):
        generate(model, np.array([[1.5, 2.0]]), 2)
    with pytest.raises(ValueError, match=r"eos_id must be a token id in \[0, 29\), got -1"):
        stream(model, [[1]], 2, eos_id=-1)
    runs = {tuple(generate(model, [[1]], 8, seed=None)[0]) for _ in range(5)}
    assert len(runs) > 1  # 5 runs of 8 tokens over 29 ids: all equal only if seeded alike
    assert np.array_equal(generate(model, [[1]], 8, seed=0), generate(model, [[1]], 8, seed=0))


# ---------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------


def sequence_score(model, seq, T, length_penalty, eos_id=None):
    """Hugging Face's beam score of seq's generated part (cut after the first eos),
    computed independently with full forwards over the (cropped) window."""
    new = list(seq[T:])
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id) + 1]
    total = 0.0
    for i, token in enumerate(new):
        window = np.asarray(seq[:T + i])[None, -CFG.context_length:]
        logits = to_numpy(model.forward(window))[0, -1].astype(np.float64)
        total += logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return total / len(new) ** length_penalty


def test_beam_width_one_is_greedy():
    model = tiny_model()
    prompt = prompts(3, 4, seed=3)
    np.testing.assert_array_equal(beam_search(model, prompt, 10, beam_width=1),
                                  generate(model, prompt, 10, temperature=0))
    # with eos: the eos candidate ends the row (length_penalty 0: nothing longer can win)
    free = generate(model, prompt[:1], 10, temperature=0)
    eos = int(free[0, 4 + 3])
    np.testing.assert_array_equal(
        beam_search(model, prompt[:1], 10, beam_width=1, length_penalty=0.0, eos_id=eos),
        generate(model, prompt[:1], 10, temperature=0, eos_id=eos))


def plain_beam_search(model, prompt, n, W):
    """Textbook beam search without eos, written as plainly as possible: keep the
    W sequences with the highest total log-probability, extend, repeat."""
    beams = [(0.0, list(prompt))]
    for _ in range(n):
        candidates = []
        for total, seq in beams:
            logits = to_numpy(model.forward(np.asarray(seq)[None, -CFG.context_length:]))[0, -1]
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            candidates += [(total + logp[t], seq + [t]) for t in range(len(logp))]
        beams = sorted(candidates, key=lambda c: -c[0])[:W]
    return beams[0]


def test_beam_search_matches_the_textbook_algorithm():
    model = tiny_model(seed=1)
    for seed in range(3):
        prompt = prompts(1, 3, seed=20 + seed)
        for width in (2, 3):
            out, scores = beam_search(model, prompt, 6, beam_width=width, length_penalty=0.0,
                                      return_scores=True)
            total, seq = plain_beam_search(model, prompt[0], 6, width)
            np.testing.assert_array_equal(out[0], seq)
            assert scores[0] == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("eos_id", [None, 1])
def test_a_wide_enough_beam_is_exact_search(length_penalty, eos_id):
    """With V = 5 and 3 new tokens, a beam of 125 holds every candidate, so it
    must find the best-scoring continuation of all (brute force over the 155
    sequences of 1 to 3 tokens that end in eos or have full length), and so do
    at least as well as greedy. This also checks the early stop: its bound may
    never cut off a better hypothesis. (This model and prompt are chosen so that
    the best beats greedy in 5 of the 6 cases and ends in eos at lengths 1 and 2.)"""
    cfg = GPTConfig(vocab_size=5, context_length=8, d_model=16, n_layers=2, n_heads=2)
    model = GPT(cfg, seed=1, dtype="float64")
    model.load_state_dict({k: v * (1.0 if "ln" in k else 3.0)
                           for k, v in model.state_dict().items()})
    prompt = np.array([[1, 4, 2]])

    def score(new):
        return sequence_score(model, np.concatenate([prompt[0], new]), 3, length_penalty, eos_id)

    candidates = [list(np.unravel_index(i, (5,) * n)) for n in (1, 2, 3) for i in range(5**n)]
    ended = [c for c in candidates if eos_id is not None and c[-1] == eos_id]
    candidates = [c for c in candidates if eos_id not in c[:-1]  # nothing after an eos
                  and (len(c) == 3 or c in ended)]  # ends in eos, or has the full length
    best = max(candidates, key=score)
    out, scores = beam_search(model, prompt, 3, beam_width=125, length_penalty=length_penalty,
                              eos_id=eos_id, return_scores=True)
    new = list(out[0, 3:])
    if eos_id in new:
        new = new[:new.index(eos_id) + 1]
    assert new == best and scores[0] == pytest.approx(score(best), rel=1e-9)
    greedy = generate(model, prompt, 3, temperature=0, eos_id=eos_id)
    assert scores[0] >= score(list(greedy[0, 3:])) - 1e-12


def test_a_wider_beam_can_lose_to_greedy():
    """Beam search is not monotone in the width (a known property, see Meister et
    al. 2020): here four beams all outscore greedy's prefix after two tokens, so
    greedy's path is pruned, and its continuation would have been better. The
    textbook algorithm does the same, so this is beam search, not a bug; tinylm
    does not add a greedy fallback, so as to stay the algorithm people know."""
    model = tiny_model(seed=0, scale=2.0)
    prompt = prompts(1, 3, seed=12)
    greedy = generate(model, prompt, 12, temperature=0)
    out, scores = beam_search(model, prompt, 12, beam_width=4, length_penalty=0.0,
                              return_scores=True)
    total, seq = plain_beam_search(model, prompt[0], 12, 4)
    np.testing.assert_array_equal(out[0], seq)
    assert scores[0] < sequence_score(model, greedy[0], 3, 0.0)
    assert beam_search(model, prompt, 12, beam_width=2, length_penalty=0.0,
                       return_scores=True)[1][0] >= sequence_score(model, greedy[0], 3, 0.0)


# Reference outputs of Hugging Face transformers 5.23.0 on the tiny GPT-2 of
# tests/fixtures/hf_gpt2 (GPT2LMHeadModel in float64; .generate with
# max_new_tokens=15, do_sample=False, early_stopping="never", eos_token_id=eos_id):
# (prompt, settings, new tokens up to the first eos, sequences_scores or None).
HF_GENERATE = [
    ([5, 17, 99, 4], {"num_beams": 1, "eos_id": None},
     [253, 253, 253, 88, 242, 0, 58, 308, 53, 314, 203, 102, 24, 241, 253], None),
    ([250, 3, 3, 77], {"num_beams": 1, "repetition_penalty": 1.5, "eos_id": None},
     [263, 202, 286, 108, 230, 38, 136, 53, 45, 179, 30, 234, 17, 145, 181], None),
    ([5, 17, 99, 4], {"num_beams": 4, "length_penalty": 1.0, "eos_id": None},
     [253, 45, 253, 253, 253, 253, 253, 253, 253, 253, 253, 253, 253, 253, 253],
     -0.4692046344280243),
    ([79, 99, 278, 135], {"num_beams": 3, "length_penalty": 1.0, "eos_id": 134},
     [299, 0, 31, 134], -1.0995508432388306),
    ([87, 264, 82, 130], {"num_beams": 2, "length_penalty": 0.0, "eos_id": 253},
     [253], -0.3935804069042206),
    ([17, 47, 174, 262], {"num_beams": 4, "length_penalty": 2.0, "eos_id": 45},
     [15, 253, 253, 179, 286, 0, 15, 147, 258, 15, 147, 253, 253, 45], -0.06961046159267426),
    ([22, 218, 243, 251], {"num_beams": 5, "length_penalty": -0.5, "eos_id": 253},
     [253], -1.250810980796814),
    ([279, 61, 177, 256], {"num_beams": 4, "length_penalty": 1.0, "eos_id": 45},
     [45], -1.1827539205551147),
]


@pytest.mark.parametrize("prompt, settings, expected, hf_score", HF_GENERATE)
def test_greedy_and_beam_search_match_hugging_face(prompt, settings, expected, hf_score):
    interop = pytest.importorskip("tinylm.interop")
    model, _ = interop.load_hf_gpt2(Path(__file__).parent / "fixtures" / "hf_gpt2",
                                    dtype="float64")
    eos_id = settings["eos_id"]
    if settings["num_beams"] == 1:
        out = generate(model, [prompt], 15, temperature=0, eos_id=eos_id,
                       repetition_penalty=settings.get("repetition_penalty", 1.0))
    else:
        out, scores = beam_search(model, [prompt], 15, beam_width=settings["num_beams"],
                                  length_penalty=settings["length_penalty"], eos_id=eos_id,
                                  return_scores=True)
        assert scores[0] == pytest.approx(hf_score, rel=1e-6)  # HF reports float32
    new = [int(t) for t in out[0, 4:]]
    if eos_id in new:
        assert all(t == eos_id for t in new[new.index(eos_id):])  # padding
        new = new[:new.index(eos_id) + 1]
    assert new == expected


def test_beam_search_cache_batch_and_padding(device):
    model = tiny_model(device)
    prompt = prompts(2, 5, seed=4)  # 5 + 9 tokens: crosses the context of 8
    a, sa = beam_search(model, prompt, 9, beam_width=3, return_scores=True)
    b, sb = beam_search(model, prompt, 9, beam_width=3, use_cache=False, return_scores=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(sa, sb, rtol=1e-10)
    # each row of a batch is searched on its own
    for r in range(2):
        np.testing.assert_array_equal(beam_search(model, prompt[r:r + 1], 9, beam_width=3)[0],
                                      a[r])
    # shorter finished hypotheses are padded with eos_id
    eos = int(a[0, 5 + 1])
    out = beam_search(model, prompt, 9, beam_width=3, eos_id=eos, length_penalty=0.0)
    for row in out:
        new = list(row[5:])
        if eos in new:
            assert all(t == eos for t in new[new.index(eos):])
    assert beam_search(model, prompt, 0).shape == (2, 5)


# ---------------------------------------------------------------------------
# Streaming text and the command line
# ---------------------------------------------------------------------------


def test_text_pieces_never_split_a_character():
    tok = BPETokenizer()  # no merges: one token per byte, so "é" is 2 tokens and "🙂" 4
    text = "héllo 🙂!"
    ids = tok.encode(text)
    consumed = []

    def lazily():
        for i in ids:
            consumed.append(i)
            yield i

    pieces = []
    for piece in text_pieces(tok, lazily()):
        pieces.append((piece, len(consumed)))
    assert "".join(p for p, _ in pieces) == text
    assert "\ufffd" not in "".join(p for p, _ in pieces)
    assert ("🙂", 11) in pieces  # printed once its 4th byte arrived, not before
    assert pieces[0] == ("h", 1)  # and each piece as soon as it is complete
    # a truncated character at the very end comes out as U+FFFD, like decode()
    assert "".join(text_pieces(tok, ids[:-2])) == tok.decode(ids[:-2])


TEXT = "to be or not to be, that is the question\n"


@pytest.fixture
def fake_checkpoint(monkeypatch):
    """`tinylm.checkpoint.load` returning a tiny char-level model."""
    tok = CharTokenizer.train(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, context_length=16, d_model=16, n_layers=1,
                    n_heads=2)
    calls = []

    def load(path, device="cpu"):
        calls.append((path, device))
        if path == "missing":
            raise FileNotFoundError("missing: no such checkpoint directory")
        return types.SimpleNamespace(model=GPT(cfg, seed=0, device=device), tokenizer=tok)

    import tinylm.checkpoint  # the real module stays (the run-directory lookup uses it)

    monkeypatch.setattr(tinylm.checkpoint, "load", load)
    return calls


def run_cli(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generates_and_is_reproducible(fake_checkpoint, capsys):
    args = ("--checkpoint", "ckpt", "--prompt", "to be", "--max-new-tokens", "30", "--seed", "3")
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and err == ""
    assert out.startswith("to be") and len(out) == len("to be") + 30 + 1  # + the final newline
    assert run_cli(capsys, *args)[1] == out
    assert run_cli(capsys, *args, "--no-cache")[1] == out
    assert run_cli(capsys, *args, "--temperature", "0.7", "--top-k", "5")[1] != out
    code, out, _ = run_cli(capsys, *args, "--num-samples", "2", "--top-p", "0.9", "--min-p",
                           "0.05", "--repetition-penalty", "1.2")
    assert code == 0 and out.count("--- sample") == 2
    code, out, err = run_cli(capsys, "--checkpoint", "ckpt", "--prompt", "to", "--beam-width",
                             "3", "--length-penalty", "0.5", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("to") and "beam search" in err
    assert fake_checkpoint[0] == ("ckpt", "cpu")


def test_cli_streams_token_by_token(fake_checkpoint, monkeypatch):
    writes = []

    class Recorder:
        def write(self, s):
            writes.append(s)

        def flush(self):
            writes.append(None)

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["generate", "--checkpoint", "c", "--prompt", "t", "--max-new-tokens", "7"]) == 0
    text = [w for w in writes if w is not None]
    assert text[0] == "t" and len(text) == 1 + 7 + 1  # prompt, 7 characters, newline
    assert writes.count(None) >= 9  # flushed after each piece


@pytest.mark.parametrize("args, message", [
    ((), "--checkpoint DIR"),
    (("--checkpoint", "c", "--prompt", ""), "--prompt is empty"),
    (("--checkpoint", "c", "--temperature", "-1"), "--temperature must be 0 (greedy) or a"),
    (("--checkpoint", "c", "--temperature", "1e-320"), "finite number >= 1e-06, got 1e-320"),
    (("--checkpoint", "c", "--temperature", "nan"), "--temperature must be 0 (greedy)"),
    (("--checkpoint", "c", "--temperature", "inf"), "--temperature must be 0 (greedy)"),
    (("--checkpoint", "c", "--top-p", "nan"), "--top-p must be in (0, 1]"),
    (("--checkpoint", "c", "--min-p", "nan"), "--min-p must be in [0, 1]"),
    (("--checkpoint", "c", "--repetition-penalty", "nan"), "--repetition-penalty must be in"),
    (("--checkpoint", "c", "--beam-width", "2", "--length-penalty", "inf"),
     "--length-penalty must be a finite number"),
    (("--checkpoint", "c", "--top-k", "0"), "--top-k must be >= 1"),
    (("--checkpoint", "c", "--top-p", "1.5"), "--top-p must be in (0, 1]"),
    (("--checkpoint", "c", "--min-p", "2"), "--min-p must be in [0, 1]"),
    (("--checkpoint", "c", "--repetition-penalty", "0"), "--repetition-penalty must be in [1e-06"),
    (("--checkpoint", "c", "--num-samples", "0"), "--num-samples must be >= 1"),
    (("--checkpoint", "c", "--max-new-tokens", "-5"), "--max-new-tokens must be >= 0"),
    (("--checkpoint", "c", "--beam-width", "2", "--top-k", "3"), "--top-k only apply to sampling"),
    (("--checkpoint", "c", "--length-penalty", "2"), "only applies to beam search"),
    (("--checkpoint", "c", "--prompt", "xyz"), "not in this CharTokenizer"),
    (("--checkpoint", "c", "--eos-id", "999"), "--eos-id must be a token id"),
    (("--checkpoint", "missing"), "no such checkpoint"),
    (("--hf-gpt2", "/nonexistent/gpt2"), "not a directory"),
])
def test_cli_errors_are_one_line(fake_checkpoint, capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--checkpoint", "--hf-gpt2", "--prompt", "--max-new-tokens", "--temperature",
                   "--top-k", "--top-p", "--min-p", "--repetition-penalty", "--seed",
                   "--num-samples", "--eos-id", "--no-cache", "--beam-width", "--length-penalty",
                   "--device"):
        assert option in out
    assert "greedy" in out and "{cpu,cuda,auto}" in out


def test_cli_cuda_without_gpu_is_one_line(fake_checkpoint, capsys):
    from tinylm import backend

    with backend.use_cupy(None):
        code, _, err = run_cli(capsys, "--checkpoint", "c", "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "needs CuPy and a CUDA GPU" in err


def test_cli_runs_on_the_cuda_path(fake_checkpoint, fake_cuda, capsys):
    assert get_xp("cuda") is fake_cuda
    code, out, _ = run_cli(capsys, "--checkpoint", "c", "--prompt", "to", "--device", "cuda",
                           "--max-new-tokens", "5", "--seed", "1")
    assert code == 0 and fake_checkpoint[-1] == ("c", "cuda")
    cpu = run_cli(capsys, "--checkpoint", "c", "--prompt", "to", "--max-new-tokens", "5",
                  "--seed", "1")[1]
    assert out == cpu  # the same seed, the same text on both backends


def test_cli_with_a_saved_checkpoint(tmp_path, capsys):
    checkpoint = pytest.importorskip("tinylm.checkpoint")
    tok = CharTokenizer.train(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, context_length=16, d_model=16, n_layers=1,
                    n_heads=2)
    checkpoint.save(tmp_path / "ckpt", GPT(cfg, seed=0), tokenizer=tok)
    code, out, err = run_cli(capsys, "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "to be",
                             "--max-new-tokens", "25", "--seed", "0")
    assert code == 0 and out.startswith("to be") and len(out) == len("to be") + 25 + 1, err


def test_cli_with_a_hugging_face_gpt2(capsys):
    pytest.importorskip("tinylm.interop")
    fixture = str(Path(__file__).parent / "fixtures" / "hf_gpt2")
    code, out, err = run_cli(capsys, "--hf-gpt2", fixture, "--prompt", "Hello", "--seed", "1",
                             "--max-new-tokens", "12", "--top-k", "20")
    assert code == 0 and out.startswith("Hello"), err
    code, out, err = run_cli(capsys, "--hf-gpt2", fixture, "--prompt", "Hello", "--beam-width",
                             "3", "--max-new-tokens", "12")
    assert code == 0 and out.startswith("Hello") and "beam search, width 3" in err


def test_cli_accepts_a_run_directory(fake_checkpoint, capsys, tmp_path):
    """`tinylm generate --checkpoint RUN_DIR` uses RUN_DIR/best (else RUN_DIR/last)."""
    for name in ("best", "last"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    code, _, _ = run_cli(capsys, "--checkpoint", str(tmp_path), "--prompt", "to",
                         "--max-new-tokens", "3")
    assert code == 0 and fake_checkpoint[-1][0] == str(tmp_path / "best")
