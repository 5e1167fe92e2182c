"""The JSON API's requests: what each endpoint accepts, its limits, and its errors.

Nothing here knows about HTTP sockets or the model: a request body (bytes) goes
in, a checked request comes out, or an `ApiError` that carries the HTTP status
and a message naming what was wrong (a field, or a limit). The server turns an
ApiError into `{"error": message}` with that status, so a client never sees a
traceback. docs/serve.md lists the same fields for users.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from tinylm.sampling import SamplingSettings


class ApiError(Exception):
    """A request the server refuses: `status` is the HTTP status, `message` says why,
    `limit` names the limit that was exceeded (or None)."""

    def __init__(self, status: int, message: str, limit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.limit = status, message, limit

    def to_json(self) -> dict:
        body = {"error": self.message}
        if self.limit is not None:
            body["limit"] = self.limit
        return body


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. A local tool still needs them: a typo such as
    max_new_tokens=1000000 would otherwise hold the model for an hour."""

    max_body_bytes: int = 64 * 1024  # a request body larger than this: 413
    max_prompt_tokens: int = 4096  # after tokenizing: 413 (the model sees its context's worth)
    max_new_tokens: int = 1000  # per generate request: 400
    max_candidates: int = 50  # candidates listed per step: 400

    def to_json(self) -> dict:
        return asdict(self)


def parse_body(raw: bytes) -> dict:
    """A request body -> the JSON object it holds, or a 400 that says why not."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ApiError(400, f"bad JSON: {exc.msg} ({where})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# -- one field at a time -------------------------------------------------------------


def _check_fields(body: dict, allowed: tuple[str, ...]) -> None:
    """Unknown fields are an error: a typo ("topk") silently ignored would be worse."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; the fields are: {', '.join(allowed)}")


def _field(body: dict, name: str, kind: str, default=None, nullable: bool = True):
    """body[name] checked to be of `kind` ("int", "number", "bool", "str", "ids"),
    or `default` when absent. JSON null means "off" (the default) where nullable."""
    value = body.get(name)
    if value is None:
        if name in body and not nullable:
            raise ApiError(400, f"{name} must not be null")
        return default
    is_int = isinstance(value, int) and not isinstance(value, bool)  # JSON true is no number
    # Python's json reads NaN and Infinity too; no setting accepts them
    is_number = (is_int or isinstance(value, float)) and math.isfinite(value)
    ok = {
        "int": is_int,
        "number": is_number,
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "ids": isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[kind]
    if not ok:
        wanted = {"int": "an integer", "number": "a number", "bool": "true or false",
                  "str": "a string", "ids": "a list of token ids (integers)"}[kind]
        raise ApiError(400, f"{name} must be {wanted}, got {json.dumps(value)[:60]}")
    return value


# -- the endpoints' requests ----------------------------------------------------------

GENERATE_FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                   "repetition_penalty", "seed", "candidates", "attention")


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_new_tokens: int
    settings: SamplingSettings  # temperature, top_k, top_p, min_p, repetition_penalty
    seed: int | None  # None: a different sample every time
    candidates: int  # how many candidates each token event lists
    attention: bool  # each token event carries the attention of the position that drew it


def parse_generate(body: dict, limits: Limits) -> GenerateRequest:
    _check_fields(body, GENERATE_FIELDS)
    prompt = _field(body, "prompt", "str", nullable=False)
    if not prompt:
        raise ApiError(400, "prompt is missing or empty: give at least one character to continue")
    max_new = _field(body, "max_new_tokens", "int", 200, nullable=False)
    if not 0 <= max_new <= limits.max_new_tokens:
        raise ApiError(400, f"max_new_tokens must be in [0, {limits.max_new_tokens}] (the "
                            f"server's max_new_tokens limit), got {max_new}", "max_new_tokens")
    candidates = _field(body, "candidates", "int", 10, nullable=False)
    if not 0 <= candidates <= limits.max_candidates:
        raise ApiError(400, f"candidates must be in [0, {limits.max_candidates}] (the server's "
                            f"max_candidates limit), got {candidates}", "max_candidates")
    try:  # SamplingSettings checks the ranges and names the field in its message
        settings = SamplingSettings(
            temperature=_field(body, "temperature", "number", 1.0),
            top_k=_field(body, "top_k", "int"),
            top_p=_field(body, "top_p", "number"),
            min_p=_field(body, "min_p", "number"),
            repetition_penalty=_field(body, "repetition_penalty", "number", 1.0),
        )
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    seed = _field(body, "seed", "int")
    if seed is not None and seed < 0:
        raise ApiError(400, f"seed must be an integer >= 0 or null, got {seed}")
    return GenerateRequest(prompt, max_new, settings, seed, candidates,
                           _field(body, "attention", "bool", False, nullable=False))


def parse_tokenize(body: dict) -> str:
    _check_fields(body, ("text",))
    return _field(body, "text", "str", nullable=False) or ""


def parse_attention(body: dict, limits: Limits, vocab_size: int) -> list[int]:
    """The token ids before the token of interest: the attention shown is that of
    the last of them, the position whose logits drew the next token."""
    _check_fields(body, ("ids",))
    ids = _field(body, "ids", "ids", nullable=False)
    if not ids:
        raise ApiError(400, "ids is missing or empty: give the token ids before the token "
                            "whose choice you want to look at")
    most = limits.max_prompt_tokens + limits.max_new_tokens
    if len(ids) > most:
        raise ApiError(413, f"ids has {len(ids)} tokens; the limit is {most} "
                            "(max_prompt_tokens + max_new_tokens)", "max_prompt_tokens")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"ids must be token ids in [0, {vocab_size}), got {bad}")
    return ids


def parse_stop(body: dict) -> str | None:
    """The id of the generation to stop (from its start event), or None: whichever runs."""
    _check_fields(body, ("id",))
    return _field(body, "id", "str")
