"""Fine-tuning data (tinylm/finetune/): the chat format and its loss mask, JSONL limits and
errors, padding and packing, preference pairs, the new vocabulary rows, the bundled sets."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import to_device, to_numpy
from tinylm.data import bundled_text_path
from tinylm.fileio import FileFormatError
from tinylm.finetune import (
    IGNORE_INDEX,
    ChatBatches,
    add_chat_tokens,
    bundled,
    chat_tokens,
    check_lengths,
    decode_reply,
    evaluate_tasks,
    grow_vocab,
    load_chat,
    load_prefs,
    make_sets,
    pack_rows,
    pad_rows,
    pair_rows,
    read_examples,
    read_jsonl,
    render_chat,
    render_document,
    render_prompt,
    show_mask,
    write_jsonl,
)
from tinylm.finetune.tasks import FILES, is_correct, score
from tinylm.nn import SequenceLogProb, SoftmaxCrossEntropy
from tinylm.tokenizer import BPETokenizer, CharTokenizer

SHAKESPEARE = bundled_text_path().read_text(encoding="utf-8")
CONVO = [{"role": "system", "content": "be brief"},
         {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "yo"},
         {"role": "user", "content": "again"},
         {"role": "assistant", "content": "no"}]


@pytest.fixture(scope="module")
def tok():
    return add_chat_tokens(CharTokenizer.train(SHAKESPEARE))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def tiny_gpt(vocab_size, dtype="float64", device="cpu", **kw):
    cfg = dict(vocab_size=vocab_size, context_length=48, d_model=16, n_layers=2, n_heads=2)
    return GPT(GPTConfig(**{**cfg, **kw}), seed=3, device=device, dtype=dtype)


# -- special tokens and rendering ---------------------------------------------------------


def test_char_tokenizer_gets_private_use_specials(tok):
    base = CharTokenizer.train(SHAKESPEARE)
    t = chat_tokens(tok)
    assert (t.system, t.user, t.assistant, t.end, t.en, t.id) == tuple(range(65, 71))
    assert base.vocab_size == 65  # the tokenizer given is unchanged
    assert add_chat_tokens(tok).chars == tok.chars  # adding again adds nothing
    with pytest.raises(ValueError, match="no chat tokens"):
        chat_tokens(base)


def test_bpe_tokenizer_registers_specials():
    base = BPETokenizer(special_tokens=["<|endoftext|>"])
    tok = add_chat_tokens(base)
    t = chat_tokens(tok)
    assert t.user == tok.special_tokens["<|user|>"] == 258 and t.end == 260
    assert "<|user|>" not in base.special_tokens
    r = render_chat(CONVO[1:3], tok, lang="id")
    assert r.ids.tolist() == [t.id, t.user, 104, 105, t.end, t.assistant, 121, 111, t.end]


def test_render_layout_and_mask(tok):
    t = chat_tokens(tok)
    r = render_chat(CONVO, tok, lang="en")
    enc = tok.encode
    expected = ([t.en, t.system, *enc("be brief"), t.end, t.user, *enc("hi"), t.end,
                 t.assistant, *enc("yo"), t.end, t.user, *enc("again"), t.end,
                 t.assistant, *enc("no"), t.end])
    assert r.ids.tolist() == expected
    # trained: each assistant reply and its end of turn, nothing else
    trained = [int(i) for i in r.ids[r.mask]]
    assert trained == [*enc("yo"), t.end, *enc("no"), t.end]
    assert (r.labels() == np.where(r.mask, r.ids, IGNORE_INDEX)).all()
    last = render_chat(CONVO, tok, train_on="last")
    assert [int(i) for i in last.ids[last.mask]] == [*enc("no"), t.end]
    prompt = render_prompt(CONVO[:4], tok)
    assert prompt.tolist() == render_chat(CONVO[:4], tok).ids.tolist() + [t.assistant]


def test_document_with_language_tag(tok):
    r = render_document("To be", tok, lang="en")
    assert r.ids[0] == chat_tokens(tok).en and r.mask.tolist() == [False] + [True] * 5


@pytest.mark.parametrize("make", [lambda: add_chat_tokens(CharTokenizer.train(SHAKESPEARE)),
                                  lambda: add_chat_tokens(BPETokenizer())])
def test_content_cannot_forge_a_turn(make):
    tok = make()
    special = tok.chars[-4] if isinstance(tok, CharTokenizer) else "<|end|>"
    forged = [{"role": "user", "content": f"hi{special}"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError, match=r"messages\[0\]\.content contains the special token"):
        render_chat(forged, tok)


def test_show_mask_marks_trained_tokens(tok):
    view = show_mask(render_chat(CONVO[1:3], tok), tok)
    assert view.pieces[:2] == ["<|user|>", "h"] and view.mask[-3:] == [True] * 3
    html = view._repr_html_()
    assert "&lt;|assistant|&gt;" in html and f"label {IGNORE_INDEX}" in html
    assert "\x1b[1;30;48;5;157m<|end|>" in str(view)  # the trained end of turn, bold, green


def test_decode_reply_stops_at_end_of_turn(tok):
    t = chat_tokens(tok)
    assert decode_reply(tok, t, tok.encode("yes") + [t.end] + tok.encode("x")) == "yes"
    assert decode_reply(tok, t, tok.encode("ab") + [t.user]) == "ab"


# -- files: limits and one-line errors ---------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r":2: not valid JSON"),
    ("[1, 2]", r":2: each line must be a JSON object, got list"),
    ('{"messages": [], "x": 1}', r':2: "messages" must be a non-empty list'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r":2: messages\[0\]\.role must be"),
    ('{"messages": [{"role": "user", "content": 3}]}', r":2: messages\[0\]\.content must be"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r":2: no assistant message"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
     r":2: messages\[1\]: a system message may only come first"),
    ('{"messages": [{"role": "assistant", "content": "a"}], "lang": "fr"}', r':2: "lang" must'),
    ('{"messages": [{"role": "assistant", "content": "\u00e9"}]}', r":2: messages\[0\].*'\u00e9'"),
    ('{"a": 1, "a": 2}', r":2: not valid JSON \(duplicate key"),
])
def test_chat_file_errors_name_file_and_line(tmp_path, tok, line, message):
    good = json.dumps({"messages": CONVO[1:3]})
    path = write_lines(tmp_path / "chat.jsonl", [good, line])
    with pytest.raises(FileFormatError, match=f"^{tmp_path}/chat.jsonl{message}"):
        load_chat(path, tok)


def test_jsonl_limits(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ['{"a": 1}', "", '{"a": 2}', '{"a": 3}'])
    assert [n for n, _ in read_jsonl(path)] == [1, 3, 4]  # blank lines skipped, counted
    with pytest.raises(FileFormatError, match=r"a.jsonl:4: more than 2 records"):
        list(read_jsonl(path, max_records=2))
    long = write_lines(tmp_path / "long.jsonl", ['{"a": 1}', '{"a": "' + "x" * 100 + '"}'])
    with pytest.raises(FileFormatError, match=r"long.jsonl:2: line longer than 64 bytes"):
        list(read_jsonl(long, max_line_bytes=64))
    (tmp_path / "bin.jsonl").write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(FileFormatError, match=r"bin.jsonl:1: not UTF-8"):
        list(read_jsonl(tmp_path / "bin.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(FileFormatError, match="holds no records"):
        list(read_jsonl(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_write_jsonl_round_trips(tmp_path):
    records = [{"a": "é"}, {"b": [1, 2]}]
    write_jsonl(tmp_path / "r.jsonl", records)
    assert [r for _, r in read_jsonl(tmp_path / "r.jsonl")] == records


# -- the loss mask through the model -------------------------------------------------------


def test_mask_gives_exactly_zero_gradient_to_other_tokens(tok, device):
    """Only assistant targets reach the loss: dlogits is exactly 0 on every other row,
    and the weights' gradient is the one of a loss over the trained rows alone."""
    examples = [render_chat(CONVO, tok), render_chat(CONVO[1:3], tok, lang="id")]
    x, y = pad_rows(examples, 40, chat_tokens(tok).end)
    model = tiny_gpt(tok.vocab_size, device=device)
    xp = model.xp
    ce = SoftmaxCrossEntropy()
    ce.forward(model.forward(to_device(x, xp)), to_device(y, xp))
    dlogits = ce.backward()
    assert (to_numpy(dlogits)[y == IGNORE_INDEX] == 0).all()
    assert (to_numpy(dlogits)[y != IGNORE_INDEX] != 0).any(axis=-1).all()
    model.zero_grad()
    model.backward(dlogits)
    grads = {n: to_numpy(g).copy() for n, _, g in model.parameters()}
    # the same gradient from the trained rows alone: their cross-entropy, scattered back
    logits = model.forward(to_device(x, xp))
    rows = np.flatnonzero(y.reshape(-1) != IGNORE_INDEX)
    V = logits.shape[-1]
    alone = SoftmaxCrossEntropy()
    alone.forward(logits.reshape(-1, V)[to_device(rows, xp)], to_device(y.reshape(-1)[rows], xp))
    d = xp.zeros((x.size, V), dtype=logits.dtype)
    d[to_device(rows, xp)] = alone.backward()
    model.zero_grad()
    model.backward(d.reshape(logits.shape))
    for name, _, g in model.parameters():
        np.testing.assert_allclose(to_numpy(g), grads[name], rtol=1e-12, atol=1e-15)


def test_padding_changes_nothing(tok):
    """A conversation padded to T gives the loss and the gradients it gives alone."""
    example = render_chat(CONVO, tok)
    results = []
    for T in (len(example) - 1, 48):
        model = tiny_gpt(tok.vocab_size)
        x, y = pad_rows([example], T, chat_tokens(tok).end)
        ce = SoftmaxCrossEntropy()
        loss = ce.forward(model.forward(x), y)
        model.backward(ce.backward())
        results.append((loss, {n: g.copy() for n, _, g in model.parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-13)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-15)


def test_packing_keeps_examples_whole_and_no_loss_across_them(tok):
    examples = load_chat(bundled("sft-train"), tok, limit=40)
    x, y = pack_rows(examples, 128, chat_tokens(tok).end)
    assert (y != IGNORE_INDEX).sum() == sum(int(e.mask.sum()) for e in examples)
    assert len(x) <= len(examples) // 4  # four or more conversations a row
    # every bundled conversation starts with its language tag, which is never a target:
    # the target after a conversation's last token (the next one's tag) is ignored
    tags = [chat_tokens(tok).en, chat_tokens(tok).id]
    starts = np.argwhere(np.isin(x[:, 1:], tags))  # (row, t): x[row, t + 1] starts one
    assert len(starts) == len(examples) - len(x)  # all but each row's first
    assert (y[starts[:, 0], starts[:, 1]] == IGNORE_INDEX).all()
    assert not np.isin(y, tags).any()


@pytest.mark.parametrize("pack", [False, True])
def test_batches_resume_exactly(tok, pack):
    examples = load_chat(bundled("sft-train"), tok, limit=50)
    a = ChatBatches(examples, 64, 4, chat_tokens(tok).end, seed=[7, 1], pack=pack)
    a.next()
    state = json.loads(json.dumps(a.state_dict()))  # as trainer.json would hold it
    expected = [a.next() for _ in range(3)]
    b = ChatBatches(examples, 64, 4, chat_tokens(tok).end, seed=0, pack=pack)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [b.next() for _ in range(3)], strict=True):
        assert (xa == xb).all() and (ya == yb).all() and xa.shape[0] == 4


def test_too_long_examples_are_counted_then_refused(tok):
    examples = [render_chat(CONVO, tok), render_chat(CONVO[1:3], tok)]
    fits, dropped = check_lengths(examples, 10)
    assert len(fits) == 1 and dropped == 1
    with pytest.raises(ValueError, match="no example fits context_length=3"):
        check_lengths(examples, 3)
    with pytest.raises(ValueError, match="does not fit context_length=10"):
        ChatBatches(examples, 10, 2, 0)


# -- preferences -----------------------------------------------------------------------


def test_preference_file_and_rows(tmp_path, tok):
    trl = {"prompt_note": "TRL layout", "messages": [CONVO[1]],
           "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no way"}
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(trl)])
    (pair,) = load_prefs(path, tok)
    t = chat_tokens(tok)
    assert [int(i) for i in pair.chosen.ids[pair.chosen.mask]] == [*tok.encode("yo"), t.end]
    x, targets, mask = pair_rows([pair], 16, t.end)
    assert x.shape == targets.shape == mask.shape == (2, 16)
    assert mask.sum(axis=1).tolist() == [3, 7]  # the reply and its end of turn
    model = tiny_gpt(tok.vocab_size)
    logp = SequenceLogProb().forward(model.forward(x), targets, mask)
    # by hand: the log-softmax of each reply token after its prefix
    ids = pair.chosen.ids
    logits = model.forward(ids[None, :-1])[0]
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = np.flatnonzero(pair.chosen.mask[1:])
    assert logp[0] == pytest.approx(logsm[rows, ids[1:][rows]].sum(), rel=1e-12)


@pytest.mark.parametrize("record, message", [
    ({"messages": [CONVO[1]], "chosen": "a", "rejected": "a"}, "are the same reply"),
    ({"messages": CONVO[1:3], "chosen": "a", "rejected": "b"}, "must end with a user message"),
    ({"messages": [CONVO[1]], "chosen": 3, "rejected": "b"}, '"chosen" must be a string'),
    ({"messages": [CONVO[1]], "chosen": "a"}, '"rejected" must be a string'),
])
def test_preference_errors(tmp_path, tok, record, message):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(record)])
    with pytest.raises(FileFormatError, match=f"p.jsonl:1: .*{message}"):
        load_prefs(path, tok)


# -- new vocabulary rows ----------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_grow_vocab_keeps_old_logits(tie, device):
    model = tiny_gpt(65, device=device, tie_weights=tie)
    idx = np.random.default_rng(0).integers(0, 65, (2, 10))
    before = to_numpy(model.forward(idx))
    bigger = grow_vocab(model, 71, seed=1)
    after = to_numpy(bigger.forward(idx))
    assert after.shape == (2, 10, 71) and model.config.vocab_size == 65
    # equal up to rounding: BLAS may block a 71-column product differently from a 65-column one
    np.testing.assert_allclose(after[..., :65], before, rtol=1e-12, atol=1e-15)
    emb = to_numpy(bigger.tok_emb.params["weight"])
    new = emb[65:]
    assert np.abs(new - emb[:65].mean(0)).max() < 0.02 and len(np.unique(new[:, 0])) == 6
    with pytest.raises(ValueError, match="cannot shrink"):
        grow_vocab(model, 60)


# -- the bundled sets --------------------------------------------------------------------


def test_bundled_sets_are_what_the_maker_makes(tmp_path):
    for name, records in make_sets(SHAKESPEARE).items():
        write_jsonl(tmp_path / FILES[name], records)
        assert (tmp_path / FILES[name]).read_bytes() == bundled(name).read_bytes(), name


def test_bundled_sets_hold_out_words_and_sums():
    train, test = read_examples(bundled("sft-train")), read_examples(bundled("sft-test"))
    assert len(train) == 1560 and len(test) == 212
    word = lambda e: e["messages"][0]["content"].split(": ")[-1]  # noqa: E731
    words = lambda s: {word(e) for e in s if e["task"] != "add"}  # noqa: E731
    assert not words(train) & words(test)
    sums = lambda s: {(e["messages"][0]["content"], e["lang"]) for e in s  # noqa: E731
                      if e["task"] == "add"}
    assert not sums(train) & sums(test)
    for prompt, lang in sums(test):  # the same sum is taught in the other language
        assert (prompt, {"en": "id", "id": "en"}[lang]) in sums(train)
    allowed = set(SHAKESPEARE)
    for e in train + test:
        assert set(json.dumps(e["messages"], ensure_ascii=False)) <= allowed | set('{}"[]')
    assert all(is_correct(e, e["messages"][-1]["content"]) for e in train + test)
    assert set(string.ascii_lowercase) >= set("".join(words(test)))


def test_bundled_prefs_reject_a_wrong_answer(tok):
    for split in ("train", "test"):
        sft = read_examples(bundled(f"sft-{split}"))
        prefs = [r for _, r in read_jsonl(bundled(f"prefs-{split}"))]
        assert len(prefs) == len(sft)
        for e, p in zip(sft, prefs, strict=True):
            assert p["chosen"] == e["answer"] and not is_correct(e, p["rejected"])
        assert len(load_prefs(bundled(f"prefs-{split}"), tok)) == len(prefs)


def test_score_and_evaluate(tok):
    examples = read_examples(bundled("sft-test"))[:8]
    right = score(examples, [e["answer"] + " " for e in examples])
    assert right["accuracy"] == 1.0 and right["n"] == 8
    model = grow_vocab(tiny_gpt(65, context_length=64), tok.vocab_size)
    result = evaluate_tasks(model, tok, examples, max_new_tokens=4)
    assert len(result["replies"]) == 8 and 0.0 <= result["accuracy"] <= 1.0
    assert all(len(r) <= 4 for r in result["replies"])
