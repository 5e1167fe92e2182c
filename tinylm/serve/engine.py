"""The model side of `tinylm serve`: one generation at a time, explained step by step.

A generation here is the loop of `tinylm.decoding.stream`, written out so that
each step can report more than its token:

    logits = decoder.next_logits(seq)              the model (KV cache, as `generate`)
    token  = sample_next(logits, rng, seq, ...)    the same draw as `generate`: same seed, same text
    before = next_token_probs(logits, seq, temperature, repetition_penalty)   no filter yet
    after  = next_token_probs(logits, seq, ...every setting)                  what was drawn from

and which filter (top-k, top-p, min-p) removed each candidate, found by applying
them one more at a time (`filter_logits` applies them in that order).

One model, one user at a time: every layer keeps what its last forward computed
(for backward, or the attention weights), and the KV cache belongs to one sequence,
so two generations must not interleave on it. A lock admits one; a second request
is refused at once (503, "busy") instead of waiting behind a request that may run
for minutes.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import threading
import time
from dataclasses import asdict

import numpy as np

from tinylm.backend import to_numpy
from tinylm.sampling import Decoder, filter_logits, next_token_probs, sample_next
from tinylm.serve.api import ApiError, GenerateRequest, Limits

FILTERS = (("top-k", "top_k"), ("top-p", "top_p"), ("min-p", "min_p"))  # in the order applied


def _busy() -> ApiError:
    return ApiError(503, "busy: the model is generating for another request (another tab?); "
                         "try again when it finishes, or stop it with POST /api/stop")


class Engine:
    """A loaded model and tokenizer behind a lock. `source` names where they came from."""

    def __init__(self, model, tokenizer, *, limits: Limits | None = None, source: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or Limits()
        self.source = source
        self.eos_id = getattr(tokenizer, "special_tokens", {}).get("<|endoftext|>")
        self._lock = threading.Lock()  # held by the one request using the model
        self._current: Generation | None = None  # the running generation, for /api/stop
        self._ids = itertools.count(1)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # -- the endpoints ----------------------------------------------------------------

    def info(self) -> dict:
        cfg = self.model.config
        return {
            "model": {"source": self.source, "config": cfg.to_dict(),
                      "parameters": int(sum(p.size for _, p, _ in self.model.parameters()))},
            "tokenizer": {"kind": type(self.tokenizer).__name__,
                          "vocab_size": self.tokenizer.vocab_size, "eos_id": self.eos_id},
            "limits": self.limits.to_json(),
            "busy": self.busy,
        }

    def tokenize(self, text: str) -> dict:
        ids = self.encode(text)
        return {"ids": ids, "tokens": [self.token_text(i) for i in ids], "count": len(ids)}

    def start(self, request: GenerateRequest) -> Generation:
        """Take the model for `request`, or raise 503 at once if it is taken.
        The caller iterates the Generation and must `close()` it (that frees the model)."""
        prompt_ids = self.encode(request.prompt)  # before the lock: a bad prompt is not "busy"
        if len(prompt_ids) > self.limits.max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(prompt_ids)} tokens; the limit is "
                                f"{self.limits.max_prompt_tokens} (max_prompt_tokens)",
                           "max_prompt_tokens")
        if not self._lock.acquire(blocking=False):
            raise _busy()
        self._current = Generation(self, f"g{next(self._ids)}", prompt_ids, request)
        return self._current

    def stop(self, gen_id: str | None = None) -> bool:
        """Ask the running generation (the one with `gen_id`, if given) to stop after its
        current step. True if there was one to stop."""
        current = self._current
        if current is None or (gen_id is not None and current.id != gen_id):
            return False
        current.cancelled.set()
        return True

    def attention(self, ids: list[int]) -> dict:
        """The attention of the last of `ids` (the position whose logits chose the
        token after it) over the tokens it sees, in every layer and head."""
        if not self._lock.acquire(blocking=False):
            raise _busy()
        try:
            start, weights = attention_rows(self.model, ids)
        finally:
            self._lock.release()
        L, H = len(weights), len(weights[0])
        return {"start": start, "tokens": [self.token_text(i) for i in ids[start:]],
                "layers": L, "heads": H, "weights": weights}

    # -- text <-> ids -----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        from tinylm.generate_cli import _encode  # special-token text such as <|endoftext|>

        try:
            return _encode(self.tokenizer, text)
        except ValueError as exc:  # e.g. a character the CharTokenizer never saw
            raise ApiError(400, f"cannot tokenize the text: {exc}") from None

    def token_text(self, token: int) -> str:
        """One token shown on its own (a byte-level token holding part of a UTF-8
        character shows as U+FFFD)."""
        if hasattr(self.tokenizer, "decode_bytes"):
            return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")
        return self.tokenizer.decode([token])

    def _release(self, generation: Generation) -> None:
        if self._current is generation:
            self._current = None
        self._lock.release()


class Generation:
    """One generate request: iterate it for its events (dicts), then close() it."""

    def __init__(self, engine: Engine, gen_id: str, prompt_ids: list[int],
                 request: GenerateRequest):
        self.engine, self.id = engine, gen_id
        self.prompt_ids, self.request = prompt_ids, request
        self.cancelled = threading.Event()  # set by /api/stop, a lost client, or Ctrl-C
        self._events = self._run()
        self._closed = False

    def __iter__(self):
        return self._events

    def close(self) -> None:
        """Stop (if still running), put the model's mode back, free the model. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.cancelled.set()
        self._events.close()  # runs the generator's `finally`
        self.engine._release(self)

    def _run(self):
        engine, req = self.engine, self.request
        model, settings = engine.model, asdict(req.settings)
        pieces = _Pieces(engine.tokenizer)
        yield {"type": "start", "id": self.id,
               "prompt": [{"id": i, "text": pieces.add(i)} for i in self.prompt_ids],
               "settings": {**settings, "seed": req.seed, "max_new_tokens": req.max_new_tokens},
               "context_length": model.config.context_length}
        rng = np.random.default_rng(req.seed)  # as `generate`: the same seed, the same tokens
        seq = np.array([self.prompt_ids], dtype=np.int64)  # (1, n) the text so far
        reason, n_new, t0 = "length", 0, time.perf_counter()
        was_training = model.training
        model.eval()  # no dropout; forward_cached insists
        try:
            decoder = Decoder(model, 1, use_cache=True)
            for index in range(req.max_new_tokens):
                if self.cancelled.is_set():
                    reason = "stopped"
                    break
                logits = decoder.next_logits(seq)  # (1, V) host float64
                token = int(sample_next(logits, rng, seq, **settings)[0])
                if token == engine.eos_id:  # as `tinylm generate`: the end, not shown
                    reason = "eos"
                    break
                event = {"type": "token", "index": index, "id": token, "text": pieces.add(token),
                         **explain_step(logits[0], seq[0], req.settings, token,
                                        req.candidates, engine.token_text)}
                if req.attention:
                    start, weights = attention_rows(model, seq[0].tolist())
                    event["attention"] = {"start": start, "weights": weights}
                seq = np.concatenate([seq, [[token]]], axis=1)  # (1, n+1)
                n_new += 1
                yield event
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - t0
        yield {"type": "done", "reason": reason, "new_tokens": n_new,
               "seconds": round(seconds, 3),
               "tokens_per_second": round(n_new / seconds, 1) if seconds > 0 else None}


class _Pieces:
    """The text each token adds, as `tinylm generate` prints it: an incremental UTF-8
    decoder holds back the bytes of an unfinished character (the piece is then "")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        if hasattr(self.tokenizer, "decode_bytes"):
            return self.utf8.decode(self.tokenizer.decode_bytes([token]))
        return self.tokenizer.decode([token])


def explain_step(logits, prev_ids, settings, token: int, n_candidates: int, text) -> dict:
    """Why `token` was drawn from logits (V,): its probability before and after the
    filters, and the n most likely candidates (plus the drawn token, if not among
    them) with both probabilities and the filter that removed each (or None).

    "before": softmax after the repetition penalty and the temperature (temperature
    0, greedy, shows temperature 1: the model's own preferences);
    "after": the distribution the token was drawn from (`next_token_probs`).
    """
    base = {"temperature": settings.temperature or 1.0,
            "repetition_penalty": settings.repetition_penalty}
    before = next_token_probs(logits, prev_ids, **base)  # (V,)
    after = next_token_probs(logits, prev_ids, **asdict(settings))  # (V,)
    order = np.argsort(-before, kind="stable")[:n_candidates]  # most likely first
    shown = [int(i) for i in order] + ([token] if token not in order else [])
    cut_by = {}  # token id -> the filter that removed it
    if settings.greedy:
        cut_by = {i: "greedy" for i in shown if after[i] == 0}
    else:
        kept, so_far = np.ones(len(before), dtype=bool), dict(base)
        for name, key in FILTERS:
            if getattr(settings, key) is None:
                continue
            so_far[key] = getattr(settings, key)
            now = np.isfinite(filter_logits(logits, prev_ids, **so_far))  # (V,) still in
            cut_by.update({i: name for i in shown if kept[i] and not now[i]})
            kept = now
    return {
        "token": text(token),
        "prob": _p(after[token]),
        "prob_before": _p(before[token]),
        "candidates": [{"id": i, "text": text(i), "before": _p(before[i]),
                        "after": _p(after[i]), "cut_by": cut_by.get(i)} for i in shown],
    }


def _p(x) -> float:
    return min(max(round(float(x), 6), 0.0), 1.0)  # probabilities for JSON: [0, 1], 6 places


def attention_rows(model, ids: list[int]) -> tuple[int, list]:
    """Run `model.forward` on the last context_length of `ids` (eval mode) and read every
    layer's `attn.attention_weights` (B, H, T, T). Returns (start, weights): the window
    starts at ids[start], and weights[layer][head] is the last query's row over the
    window (rows sum to 1)."""
    T = model.config.context_length
    start = max(len(ids) - T, 0)
    was_training = model.training
    model.eval()
    try:
        with _weights_formed(model):
            model.forward(np.array([ids[start:]], dtype=np.int64))
            rows = [to_numpy(block.attn.attention_weights[0, :, -1, :]).astype(np.float64)
                    for block in model.blocks]  # L x (H, n)
    finally:
        model.clear_backward_caches()  # nothing will run backward on this forward
        model.train(was_training)
    return start, [np.round(r, 6).tolist() for r in rows]


@contextlib.contextmanager
def _weights_formed(model):
    """Flash attention computes the same attention in tiles and never forms the
    weights; for this one forward its layers take the standard path, which does."""
    flash = [block.attn for block in model.blocks
             if getattr(block.attn, "attention", "standard") == "flash"]
    for attn in flash:
        attn.attention = "standard"
    try:
        yield
    finally:
        for attn in flash:
            attn.attention = "flash"
