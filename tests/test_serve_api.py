"""`tinylm serve`'s JSON API, over real HTTP on 127.0.0.1 (an ephemeral port).

A tiny random GPT with a character tokenizer is saved as a checkpoint and served
in a background thread; the tests talk to it with http.client. Where a test needs
the model to be "in the middle of a generation", it wraps the model's
forward_cached so that each step waits on an Event (or sleeps): the timing is then
decided by the test, not by how fast the machine is. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import tinylm
import tinylm.cli
from tinylm.checkpoint import load, save
from tinylm.serve import Engine, Limits, running
from tinylm.serve.cli import is_loopback
from tinylm.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n"
LIMITS = Limits(max_body_bytes=4096, max_prompt_tokens=40, max_new_tokens=300, max_candidates=20)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = CharTokenizer.train(TEXT)
    config = tinylm.GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, d_model=16,
                              n_layers=2, n_heads=2)
    return save(tmp_path_factory.mktemp("serve") / "ckpt", tinylm.GPT(config, seed=0),
                tokenizer=tokenizer)


@pytest.fixture(scope="module")
def served(checkpoint):
    ckpt = load(checkpoint)
    engine = Engine(ckpt.model, ckpt.tokenizer, limits=LIMITS, source="test")
    with running(engine) as server:
        yield server


# -- a small HTTP client ---------------------------------------------------------------


def call(server, method, path, body=None, *, raw=None, headers=None):
    """(status, JSON answer) of one request; `raw` sends bytes as they are."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        assert "Traceback" not in text
        return resp.status, json.loads(text)
    finally:
        conn.close()


@contextlib.contextmanager
def open_stream(server, body):
    """Start POST /api/generate; yields (status, the response) to read lines from."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", "/api/generate", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        yield resp.status, resp
    finally:
        conn.close()


def next_event(resp) -> dict:
    line = resp.readline()
    assert line.endswith(b"\n"), f"a stream line must end with a newline: {line!r}"
    return json.loads(line)


def generate(server, **body) -> list[dict]:
    with open_stream(server, body) as (status, resp):
        assert status == 200, resp.read()
        assert resp.getheader("Content-Type").startswith("application/x-ndjson")
        return [json.loads(line) for line in resp.read().splitlines()]


@contextlib.contextmanager
def slowed(server, gate: threading.Event | None = None, delay: float = 0.0):
    """Each model step first waits for `gate` (at most 10 s) or sleeps `delay`."""
    model = server.engine.model
    original = model.forward_cached

    def step(*args, **kwargs):
        if gate is not None:
            gate.wait(10)
        time.sleep(delay)
        return original(*args, **kwargs)

    model.forward_cached = step  # an instance attribute hides the method
    try:
        yield
    finally:
        if gate is not None:
            gate.set()
        del model.forward_cached


def wait_until_free(server, seconds=10.0) -> bool:
    for _ in range(int(seconds / 0.05)):  # bounded polling
        if not server.engine.busy:
            return True
        time.sleep(0.05)
    return False


# -- pages and simple endpoints ---------------------------------------------------------


def test_info_describes_model_and_limits(served):
    status, info = call(served, "GET", "/api/info")
    assert status == 200
    assert info["model"]["config"]["n_layers"] == 2
    assert info["tokenizer"] == {"kind": "CharTokenizer", "vocab_size": len(set(TEXT)),
                                 "eos_id": None}
    assert info["limits"]["max_new_tokens"] == 300
    assert info["busy"] is False


def test_page_and_its_files_are_served(served):
    host, port = served.server_address[:2]
    for path, kind, marker in [("/", "text/html", 'id="prompt"'),
                               ("/app.js", "text/javascript", "/api/generate"),
                               ("/style.css", "text/css", "#output")]:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith(kind)
        assert marker in resp.read().decode()
        conn.close()
    status, answer = call(served, "GET", "/nowhere")
    assert status == 404 and "nowhere" in answer["error"]


def test_tokenize(served):
    status, answer = call(served, "POST", "/api/tokenize", {"text": "the fox"})
    assert status == 200
    assert answer["ids"] == served.engine.tokenizer.encode("the fox")
    assert answer["tokens"] == list("the fox") and answer["count"] == 7


# -- generation --------------------------------------------------------------------------


def test_generate_streams_one_token_per_event(served):
    events = generate(served, prompt="the ", max_new_tokens=12, top_k=4, seed=3, candidates=10)
    start, tokens, done = events[0], events[1:-1], events[-1]
    tokenizer = served.engine.tokenizer
    assert start["type"] == "start" and [t["id"] for t in start["prompt"]] == tokenizer.encode(
        "the ")
    assert [e["type"] for e in tokens] == ["token"] * 12
    assert [e["index"] for e in tokens] == list(range(12))
    assert done == {**done, "type": "done", "reason": "length", "new_tokens": 12}
    ids = [e["id"] for e in tokens]
    # the same seed gives what `tinylm.generate` gives, and the pieces make up the text
    expected = tinylm.generate(served.engine.model, [tokenizer.encode("the ")], 12, top_k=4,
                               seed=3)[0, 4:]
    assert ids == expected.tolist()
    assert "".join(e["text"] for e in tokens) == tokenizer.decode(ids)
    for e in tokens:
        assert 0.0 <= e["prob"] <= 1.0 and 0.0 <= e["prob_before"] <= 1.0
        cands = e["candidates"]
        assert len(cands) == 10
        befores = [c["before"] for c in cands]
        assert befores == sorted(befores, reverse=True)  # most likely first
        # top-k = 4: the first four survive (renormalised), the rest were cut by top-k
        assert all(c["cut_by"] is None and c["after"] > 0 for c in cands[:4])
        assert all(c["cut_by"] == "top-k" and c["after"] == 0 for c in cands[4:])
        assert sum(c["after"] for c in cands[:4]) == pytest.approx(1.0, abs=1e-4)
        assert sum(befores) <= 1.0 + 1e-4
        chosen = next(c for c in cands if c["id"] == e["id"])
        assert chosen["after"] == e["prob"] and chosen["before"] == e["prob_before"]


def test_candidates_name_each_filter(served):
    events = generate(served, prompt="the ", max_new_tokens=8, top_k=6, top_p=0.3, min_p=0.5,
                      seed=1, candidates=12)
    seen = set()
    for e in events[1:-1]:
        for c in e["candidates"]:
            assert c["cut_by"] in (None, "top-k", "top-p", "min-p")
            assert (c["cut_by"] is None) == (c["after"] > 0)
            seen.add(c["cut_by"])
    assert {"top-k", "top-p"} <= seen


def test_greedy_draws_with_probability_one(served):
    events = generate(served, prompt="the ", max_new_tokens=5, temperature=0, candidates=3)
    for e in events[1:-1]:
        assert e["prob"] == 1.0
        assert e["candidates"][0]["id"] == e["id"]  # the most likely one
        assert [c["cut_by"] for c in e["candidates"][1:]] == ["greedy", "greedy"]


def test_end_of_text_token_ends_the_stream(served, monkeypatch):
    first = generate(served, prompt="the ", max_new_tokens=1, temperature=0)[1]["id"]
    monkeypatch.setattr(served.engine, "eos_id", first)  # as a BPE's <|endoftext|>
    events = generate(served, prompt="the ", max_new_tokens=5, temperature=0)
    assert [e["type"] for e in events] == ["start", "done"]  # the eos token is not shown
    assert events[-1]["reason"] == "eos" and events[-1]["new_tokens"] == 0


def test_drawn_token_is_listed_even_outside_the_top(served):
    # temperature 5 flattens the distribution: the drawn token is often not the top 1
    events = generate(served, prompt="the ", max_new_tokens=20, temperature=5.0, seed=0,
                      candidates=1)
    for e in events[1:-1]:
        assert e["id"] in [c["id"] for c in e["candidates"]]
        assert len(e["candidates"]) in (1, 2)


# -- attention ---------------------------------------------------------------------------


def check_rows(weights, n_layers, n_heads, n):
    w = np.array(weights)
    assert w.shape == (n_layers, n_heads, n)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-4)


def test_attention_in_the_stream(served):
    events = generate(served, prompt="the ", max_new_tokens=3, seed=0, attention=True)
    for e in events[1:-1]:
        att = e["attention"]
        assert att["start"] == 0
        check_rows(att["weights"], 2, 2, 4 + e["index"])  # the prompt and the tokens so far


def test_attention_endpoint(served):
    ids = served.engine.tokenizer.encode("the lazy dog jumps over")  # 23 > the context, 16
    status, answer = call(served, "POST", "/api/attention", {"ids": ids})
    assert status == 200
    assert answer["start"] == len(ids) - 16 and answer["tokens"] == list("the lazy dog jumps "
                                                                        "over")[-16:]
    assert (answer["layers"], answer["heads"]) == (2, 2)
    check_rows(answer["weights"], 2, 2, 16)
    for body, word in [({"ids": []}, "empty"), ({"ids": [999]}, "token ids"),
                       ({"ids": "abc"}, "list of token ids")]:
        status, answer = call(served, "POST", "/api/attention", body)
        assert status == 400 and word in answer["error"]


# -- limits and bad requests -------------------------------------------------------------


def test_limits_are_named(served):
    status, answer = call(served, "POST", "/api/generate", raw=b'{"prompt": "' + b"a" * 5000
                          + b'"}')
    assert status == 413 and answer["limit"] == "max_body_bytes"
    assert "max_body_bytes" in answer["error"] and "4096" in answer["error"]
    status, answer = call(served, "POST", "/api/generate", {"prompt": "the " * 11})
    assert status == 413 and answer["limit"] == "max_prompt_tokens" and "44" in answer["error"]
    status, answer = call(served, "POST", "/api/generate", {"prompt": "the", "max_new_tokens": 301})
    assert status == 400 and answer["limit"] == "max_new_tokens" and "300" in answer["error"]
    status, answer = call(served, "POST", "/api/generate", {"prompt": "the", "candidates": 21})
    assert status == 400 and answer["limit"] == "max_candidates"


@pytest.mark.parametrize("raw, status, words", [
    (b'{"prompt": "the"', 400, "bad JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    (b'["the"]', 400, "JSON object"),
    (b'{"prompt": "the", "topk": 3}', 400, "unknown field 'topk'"),
    (b'{"prompt": "the", "temperature": "hot"}', 400, "temperature must be a number"),
    (b'{"prompt": "the", "temperature": NaN}', 400, "temperature must be a number"),
    (b'{"prompt": "the", "top_k": true}', 400, "top_k must be an integer"),
    (b'{"prompt": "the", "top_p": 1.5}', 400, "top_p must be in (0, 1]"),
    (b'{"prompt": "the", "seed": -1}', 400, "seed"),
    (b'{"max_new_tokens": 3}', 400, "prompt is missing"),
    (b'{"prompt": "the \\u00e9"}', 400, "cannot tokenize"),
])
def test_bad_requests_get_400_not_a_traceback(served, raw, status, words):
    got, answer = call(served, "POST", "/api/generate", raw=raw)
    assert (got, words in answer["error"]) == (status, True), answer


def test_wrong_method_and_content_type(served):
    status, answer = call(served, "GET", "/api/generate")
    assert status == 405 and "POST" in answer["error"]
    status, answer = call(served, "POST", "/api/generate", raw=b'{"prompt": "the"}',
                          headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in answer["error"]


# -- one generation at a time -------------------------------------------------------------


def test_second_generation_is_busy_until_the_first_ends(served):
    gate = threading.Event()
    with slowed(served, gate), open_stream(served, {"prompt": "the ", "max_new_tokens": 5}) as (
            status, first):
        assert status == 200
        assert next_event(first)["type"] == "start"  # the first now holds the model
        status, answer = call(served, "POST", "/api/generate", {"prompt": "the "})
        assert status == 503 and "busy" in answer["error"]
        status, answer = call(served, "POST", "/api/attention", {"ids": [1, 2]})
        assert status == 503 and "busy" in answer["error"]
        assert call(served, "GET", "/api/info")[1]["busy"] is True
        gate.set()  # let the first one run to its end
        rest = [json.loads(line) for line in first.read().splitlines()]
        assert rest[-1]["type"] == "done" and rest[-1]["new_tokens"] == 5
    assert wait_until_free(served)
    assert generate(served, prompt="the ", max_new_tokens=2)[-1]["new_tokens"] == 2


def test_stop_endpoint_ends_the_generation(served):
    with slowed(served, delay=0.02), open_stream(
            served, {"prompt": "the ", "max_new_tokens": 300}) as (status, resp):
        gen_id = next_event(resp)["id"]
        for _ in range(3):
            assert next_event(resp)["type"] == "token"
        assert call(served, "POST", "/api/stop", {"id": "g-other"})[1] == {"stopped": False}
        assert call(served, "POST", "/api/stop", {"id": gen_id})[1] == {"stopped": True}
        rest = [json.loads(line) for line in resp.read().splitlines()]
    assert rest[-1]["type"] == "done" and rest[-1]["reason"] == "stopped"
    assert 3 <= rest[-1]["new_tokens"] < 300
    assert wait_until_free(served)
    assert call(served, "POST", "/api/stop", {})[1] == {"stopped": False}  # nothing runs


def test_a_client_that_goes_away_frees_the_model(served):
    with slowed(served, delay=0.02):
        with open_stream(served, {"prompt": "the ", "max_new_tokens": 300}) as (status, resp):
            next_event(resp)
            next_event(resp)
            resp.close()  # and the connection closes as the block ends
        assert wait_until_free(served), "the server kept generating for a closed connection"
    assert generate(served, prompt="the ", max_new_tokens=1)[-1]["new_tokens"] == 1


def test_a_failing_step_ends_the_stream_with_an_error_event(served):
    model = served.engine.model
    mode = model.training

    def broken(*args, **kwargs):
        raise RuntimeError("the model broke")

    model.forward_cached = broken
    try:
        events = generate(served, prompt="the ", max_new_tokens=3)
    finally:
        del model.forward_cached
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[-1]["error"] == "RuntimeError: the model broke"
    assert wait_until_free(served) and model.training is mode  # its mode is put back


# -- the command line --------------------------------------------------------------------


def test_cli_serves_a_checkpoint_and_stops_on_ctrl_c(checkpoint):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "tinylm", "serve", "--checkpoint", str(checkpoint), "--port",
         "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()))
        reader.start()
        reader.join(60)  # start-up imports NumPy: seconds
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", lines[0] if lines else "")
        assert match, f"no address printed: {lines}"
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("GET", "/api/info")
        assert json.loads(conn.getresponse().read())["model"]["source"] == str(checkpoint)
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_warns_about_a_non_loopback_host(checkpoint, monkeypatch, capsys):
    import tinylm.serve

    class Stop(Exception):
        pass

    def no_server(*args, **kwargs):
        raise Stop  # the warning comes before binding: nothing listens on 0.0.0.0

    monkeypatch.setattr(tinylm.serve, "make_server", no_server)
    with pytest.raises(Stop):
        tinylm.cli.main(["serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0"])
    assert "warning: --host 0.0.0.0" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")


def test_cli_needs_a_model(capsys):
    assert tinylm.cli.main(["serve"]) == 2
    assert "--checkpoint DIR" in capsys.readouterr().err


def test_engine_runs_a_model_on_the_cuda_path(fake_cuda):
    # the CuPy test double (tests/fakecupy.py) refuses implicit device -> host copies
    from tinylm.serve.api import parse_generate

    tokenizer = CharTokenizer.train(TEXT)
    config = tinylm.GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, d_model=16,
                              n_layers=2, n_heads=2)
    engine = Engine(tinylm.GPT(config, seed=0, device="cuda"), tokenizer)
    generation = engine.start(parse_generate({"prompt": "the ", "max_new_tokens": 3,
                                              "attention": True, "seed": 0}, engine.limits))
    try:
        events = list(generation)
    finally:
        generation.close()
    assert [e["type"] for e in events] == ["start", "token", "token", "token", "done"]
    check_rows(events[1]["attention"]["weights"], 2, 2, 4)
    check_rows(engine.attention([1, 2, 3])["weights"], 2, 2, 3)
    assert not engine.busy


def test_attention_of_a_flash_attention_model(served):
    # flash attention never forms the weights; the attention view uses the standard path
    model = served.engine.model
    if "attention" not in vars(model.blocks[0].attn):
        pytest.skip("this CausalSelfAttention has no attention='flash' switch")
    for block in model.blocks:
        block.attn.attention = "flash"
    try:
        check_rows(served.engine.attention([1, 2, 3])["weights"], 2, 2, 3)
        assert all(block.attn.attention == "flash" for block in model.blocks)
    finally:
        for block in model.blocks:
            block.attn.attention = "standard"
