"""The trainer and `tinylm train`: presets, configuration, accumulation, schedule,
bitwise resume, Ctrl-C, divergence, best checkpoint, log and plot, the command line."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from tinylm import backend, checkpoint
from tinylm.cli import build_parser, main
from tinylm.config import GPTConfig
from tinylm.data import bundled_text_path
from tinylm.model import GPT
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.train import (
    MODEL_FIELDS,
    MODEL_VARIANT_FIELDS,
    PRESETS,
    RECIPE_MODEL,
    RESUME_FIXED,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    parse_field_value,
    read_log,
)
from tinylm.training.lock import RunDirectoryBusy
from tinylm.training.memory import step_memory_bytes
from tinylm.training.signals import StopRequested

SHAKESPEARE = bundled_text_path().read_text(encoding="utf-8")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SHAKESPEARE[:20_000], encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path, text_file):
    """A TrainConfig for a model of a few thousand parameters: steps take milliseconds."""

    def make(**changes) -> TrainConfig:
        base = dict(data=str(text_file), context_length=16, d_model=16, n_layers=2, n_heads=2,
                    batch_size=4, max_iters=8, warmup_iters=2, eval_interval=4, eval_iters=2,
                    out_dir=str(tmp_path / "run"))
        return TrainConfig(**{**base, **changes})

    return make


def weights(model) -> dict:
    return model.state_dict()


def assert_bitwise_equal(a: Trainer, b: Trainer) -> None:
    wa, wb = weights(a.model), weights(b.model)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["t"] == sb["t"]
    for key in ("m", "v"):
        for k in sa[key]:
            assert np.array_equal(sa[key][k], sb[key][k]), (key, k)


# -- configuration and presets ----------------------------------------------------------


def test_presets_are_the_published_recipes():
    cpu = PRESETS["shakespeare-char-cpu"]
    assert (cpu.context_length, cpu.batch_size, cpu.n_layers, cpu.n_heads, cpu.d_model) == \
        (64, 12, 4, 4, 128)
    assert (cpu.max_iters, cpu.lr, cpu.min_lr, cpu.warmup_iters) == (2000, 1e-3, 1e-4, 100)
    assert (cpu.beta1, cpu.beta2, cpu.weight_decay, cpu.dropout, cpu.grad_clip) == \
        (0.9, 0.99, 0.1, 0.0, 1.0)
    assert (cpu.eval_interval, cpu.eval_iters, cpu.tokenizer, cpu.device) == \
        (250, 20, "char", "cpu")
    gpu = PRESETS["shakespeare-char"]
    assert (gpu.n_layers, gpu.n_heads, gpu.d_model, gpu.context_length, gpu.batch_size) == \
        (6, 6, 384, 256, 64)
    assert (gpu.dropout, gpu.max_iters) == (0.2, 5000)
    assert PRESETS["shakespeare-bpe"].tokenizer == "bpe"
    assert TrainConfig() == cpu  # the defaults are the CPU recipe


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="unknown TrainConfig field lrr .*valid fields: data, "):
        TrainConfig().replace(lrr=1.0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields a, b in x.json"):
        TrainConfig.from_dict({"a": 1, "b": 2}, "x.json")
    with pytest.raises(TypeError, match="TrainConfig.batch_size must be int"):
        TrainConfig(batch_size="12")
    with pytest.raises(ValueError, match="TrainConfig.min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="d_model .* divisible by .*n_heads"):
        TrainConfig(d_model=100, n_heads=3)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 3.0


def test_set_values_are_typed_by_the_field():
    assert parse_field_value("lr", "3e-4") == 3e-4
    assert parse_field_value("max_iters", "500") == 500
    assert parse_field_value("bias", "true") is True and parse_field_value("bias", "off") is False
    assert parse_field_value("data", "null") is None
    assert parse_field_value("data", "a.txt") == "a.txt"
    assert parse_field_value("lr_decay_iters", "none") is None
    with pytest.raises(ValueError, match="--set lr=fast: lr must be a float"):
        parse_field_value("lr", "fast")
    with pytest.raises(ValueError, match="unknown TrainConfig field nope"):
        parse_field_value("nope", "1")


FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)
                if typing.get_type_hints(TrainConfig)[f.name] is float]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(name, value):
    """grad_clip=nan used to train, then fail to save (all steps lost); lr=inf, rope_theta=inf,
    ... passed their range checks."""
    with pytest.raises(ValueError, match=f"TrainConfig.{name} must be a finite number"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", 100_000, "GPTConfig.n_layers must be <= 4096, got 100000 (valid: 1 to 4096)"),
    ("context_length", 2**20 + 1, "GPTConfig.context_length must be <= 1048576"),
    ("d_model", 2**17, "GPTConfig.d_model must be <= 65536"),
    ("vocab_size", 2**24 + 1, "GPTConfig.vocab_size must be <= 16777216"),
    ("mlp_hidden", 2**21, "GPTConfig.mlp_hidden must be <= 1048576"),
    ("n_experts", 5000, "GPTConfig.n_experts must be <= 4096"),
    ("norm_eps", math.inf, "GPTConfig.norm_eps must be a number > 0 and < 1"),
    ("norm_eps", 1.0, "GPTConfig.norm_eps must be a number > 0 and < 1"),
    ("rope_theta", math.nan, "GPTConfig.rope_theta must be a number > 0 (finite)"),
    ("dropout", math.nan, "GPTConfig.dropout must be in [0, 1)"),
    ("moe_aux_loss_coef", math.inf, "GPTConfig.moe_aux_loss_coef must be a number >= 0"),
])
def test_gpt_config_bounds_name_the_field_and_range(field, value, message):
    shape = dict(vocab_size=65, context_length=16, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        GPTConfig(**{**shape, field: value})


def test_an_absurd_batch_is_refused_before_anything_is_allocated(tiny, tmp_path, capsys):
    config = tiny(batch_size=100_000_000)
    with pytest.raises(ValueError, match="a training step needs at least .* GiB of memory, "
                                         "more than .*batch_size 100000000"):
        Trainer(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "batch_size=100000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lower batch_size" in err


@pytest.mark.parametrize("settings", [{}, {"recompute": True}, {"attention": "flash"}])
def test_the_step_memory_estimate_is_a_lower_bound(tiny, settings):
    """Measured with tracemalloc (NumPy reports its allocations to it): the estimate
    never exceeds a real step's peak, so it never refuses a step that would fit;
    recomputation and flash attention lower it, as they lower the step's memory."""
    import tracemalloc

    config = tiny(batch_size=16, max_iters=1, eval_interval=100, **settings)
    trainer = Trainer(config)
    tracemalloc.start()
    trainer.train_step()
    trainer.train_step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    trainer.close()
    estimate = step_memory_bytes(config, trainer.tokenizer.vocab_size)
    params = trainer.model.num_parameters() * 4  # the weights existed before tracing
    assert estimate <= peak + params
    if settings:
        plain = tiny(batch_size=16, max_iters=1, eval_interval=100)
        assert estimate < step_memory_bytes(plain, trainer.tokenizer.vocab_size)


def test_model_fields_are_gpt_configs_declared_once():
    """TrainConfig takes GPTConfig's fields (all but vocab_size, the tokenizer's), with
    their types and help; only RECIPE_MODEL's defaults differ; all are fixed on resume."""
    gpt = {f.name: f for f in dataclasses.fields(GPTConfig)}
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    gpt_types, train_types = typing.get_type_hints(GPTConfig), typing.get_type_hints(TrainConfig)
    assert MODEL_FIELDS == tuple(n for n in gpt if n != "vocab_size")
    for name in MODEL_FIELDS:
        assert train_types[name] == gpt_types[name], name
        assert train[name].metadata["help"] == gpt[name].metadata["help"], name
        assert train[name].default == RECIPE_MODEL.get(name, gpt[name].default), name
        assert name in RESUME_FIXED, name
    assert set(RESUME_FIXED) - set(MODEL_FIELDS) == {"tokenizer", "vocab_size",
                                                     "tokenizer_train_chars", "val_fraction",
                                                     "dtype"}
    assert MODEL_VARIANT_FIELDS[0] == "pos" and "n_experts" in MODEL_VARIANT_FIELDS
    assert parse_field_value("d_model", "256") == 256
    assert parse_field_value("n_kv_heads", "null") is None
    assert parse_field_value("rope_theta", "500000") == 500000.0
    with pytest.raises(ValueError, match="unknown TrainConfig field vocab"):
        parse_field_value("vocab", "3")


def test_config_file_is_flat_and_its_errors_name_it(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lr": 3e-4, "d_model": 256, "n_kv_heads": None}))
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "d_model                256  *" in text and "lr                     0.0003  *" in text
    cfg.write_text("[1, 2]")
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: config file must hold a JSON" in err


# -- the optimisation step --------------------------------------------------------------


def test_gradient_accumulation_equals_one_k_times_larger_batch(tiny):
    k, B = 4, 3
    trainer = Trainer(tiny(dtype="float64", grad_accum_steps=k, batch_size=B, grad_clip=0.0,
                           dropout=0.0))
    micro = []
    draw = trainer.batches.next
    trainer.batches.next = lambda: micro.append(draw()) or micro[-1]
    before = weights(trainer.model)
    trainer.optimizer.step = lambda: None  # keep the weights: compare gradients only
    trainer.train_step()
    accumulated = {n: g.copy() for n, _, g in trainer.model.parameters()}
    assert len(micro) == k

    big = GPT(trainer.model.config, dtype="float64")
    big.load_state_dict(before)
    x = np.concatenate([m[0] for m in micro])  # (k*B, T)
    y = np.concatenate([m[1] for m in micro])
    loss_fn = SoftmaxCrossEntropy()
    big.zero_grad()
    loss_fn.forward(big.forward(x), y)
    big.backward(loss_fn.backward())
    for name, _, g in big.parameters():
        np.testing.assert_allclose(accumulated[name], g, rtol=1e-12, atol=1e-12, err_msg=name)


def test_clipping_and_the_warmup_cosine_schedule(tiny):
    trainer = Trainer(tiny(max_iters=100, warmup_iters=10, lr=1e-3, min_lr=1e-4, grad_clip=0.01))
    lrs = [trainer.lr_at(s) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup
    assert lrs[55] == pytest.approx(5.5e-4) and lrs[100] == pytest.approx(1e-4)  # cosine
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    info = trainer.train_step()
    assert info["lr"] == lrs[0] and info["grad_norm"] > 0.01
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                          for _, _, g in trainer.model.parameters()))
    assert total == pytest.approx(0.01, rel=1e-4)  # clipped before the AdamW step


def test_recompute_trains_to_the_same_weights(tiny):
    """--set recompute=true (activation recomputation) changes memory, not the run:
    with dropout on, the weights after a few steps are bit for bit the same."""
    a = Trainer(tiny(dropout=0.1, max_iters=5, out_dir=tiny().out_dir + "-a"))
    b = Trainer(tiny(dropout=0.1, max_iters=5, recompute=True, out_dir=tiny().out_dir + "-b"))
    assert b.model.recompute and not a.model.recompute
    a.train()
    b.train()
    assert_bitwise_equal(a, b)


def test_evaluation_does_not_shift_training(tiny):
    """Evaluation has its own generator and turns dropout off: how often it runs
    must not change the training batches, dropout masks or weights."""
    a = Trainer(tiny(dropout=0.1, max_iters=5, eval_interval=1, out_dir=tiny().out_dir + "-a"))
    b = Trainer(tiny(dropout=0.1, max_iters=5, eval_interval=100, out_dir=tiny().out_dir + "-b"))
    a.train()
    b.train()
    assert_bitwise_equal(a, b)
    ev = [r for r in read_log(a.log_path) if r["event"] == "eval"]
    assert [r["step"] for r in ev] == list(range(6))
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in ev)


# -- resume, Ctrl-C, divergence -----------------------------------------------------------


class StopAt:
    """A reporter that raises KeyboardInterrupt (as Ctrl-C would) after step `k`."""

    def __init__(self, k):
        self.k = k
        self.events = []

    def __call__(self, event, info):
        self.events.append((event, info))
        if event == "step" and info["step"] == self.k:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [3, 4])  # mid-interval, and right after an evaluation
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny, stop):
    config = tiny(dropout=0.2, max_iters=8)  # dropout > 0: its generators must be restored
    straight = Trainer(config.replace(out_dir=config.out_dir + "-straight"))
    straight.train()

    stopper = StopAt(stop)
    first = Trainer(config, reporter=stopper)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert ("interrupted", {"step": stop, "path": str(first.last_dir),
                            "signal": "SIGINT"}) in stopper.events
    assert checkpoint.read_trainer_state(first.last_dir)["step"] == stop

    resumed = Trainer(config, resume=first.last_dir)
    assert resumed.step == stop
    result = resumed.train()
    assert result["step"] == 8
    assert_bitwise_equal(straight, resumed)
    assert result["val_loss"] == straight.result()["val_loss"]  # evaluation too
    # the log reads as one run: every step once, in order
    steps = [r["step"] for r in read_log(resumed.log_path) if r["event"] == "step"]
    assert steps == list(range(1, 9))


def test_real_ctrl_c_saves_the_last_completed_step(tiny):
    def press_ctrl_c(event, info):
        if event == "step" and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next step boundary

    trainer = Trainer(tiny(), reporter=press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.step == 2
    ck = checkpoint.load(trainer.last_dir)
    assert ck.trainer_state["step"] == 2 and ck.optimizer_state["t"] == 2
    for name, w in weights(trainer.model).items():
        assert np.array_equal(ck.model.state_dict()[name], w)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_saves_the_last_completed_step_as_ctrl_c_does(tiny, sig, code):
    """SIGTERM: what a scheduler or `docker stop` sends; SIGHUP: a closed terminal."""
    def terminate(event, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), sig)

    trainer = Trainer(tiny(), reporter=terminate)
    with pytest.raises(StopRequested) as stop:
        trainer.train()
    assert stop.value.signal_name == sig.name and stop.value.exit_code == code
    assert checkpoint.read_trainer_state(trainer.last_dir)["step"] == 3
    assert read_log(trainer.log_path)[-1] == {"event": "interrupted", "step": 3,
                                              "signal": sig.name}
    assert signal.getsignal(sig) is signal.SIG_DFL  # handler restored
    assert Trainer(tiny(), resume=trainer.last_dir).train()["step"] == 8


def test_an_ignored_signal_stays_ignored(tiny):
    """`nohup` ignores SIGHUP so that a run outlives its terminal: it must go on."""
    def hang_up(event, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGHUP)

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert Trainer(tiny(), reporter=hang_up).train()["step"] == 8
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sigterm_in_the_command_exits_143(tmp_path, text_file, capsys, monkeypatch):
    real = Trainer.train_step

    def terminated_at_3(self):
        info = real(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return info

    monkeypatch.setattr(Trainer, "train_step", terminated_at_3)
    assert main(tiny_args(text_file, tmp_path / "run") + ["--max-iters", "6"]) == 143
    out, err = capsys.readouterr()
    assert "stopped by SIGTERM: saved the state after step 3" in out
    assert err == "tinylm train: stopped by SIGTERM\n"
    assert checkpoint.read_trainer_state(tmp_path / "run" / "last")["step"] == 3


def test_resuming_from_best_trains_on_to_max_iters(tiny, tmp_path):
    """The best checkpoint is usually behind last/: resuming from it continues from its
    step, to max_iters, exactly as the run that produced it would have."""
    config = tiny(max_iters=12, eval_interval=4)
    straight = Trainer(config.replace(out_dir=config.out_dir + "-straight"))
    straight.train()

    first = Trainer(config, reporter=StopAt(5))  # after the evaluation at step 4
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert checkpoint.read_trainer_state(first.best_dir)["step"] == 4
    early_best = tmp_path / "best-at-4"
    shutil.copytree(first.best_dir, early_best)
    Trainer(config, resume=first.last_dir).train()  # on to 12
    shutil.rmtree(first.best_dir)
    shutil.copytree(early_best, first.best_dir)  # as if step 4 had stayed the best

    resumed = Trainer(config, resume=first.best_dir)
    assert resumed.step == 4
    assert resumed.train()["step"] == 12
    assert_bitwise_equal(straight, resumed)
    steps = [r["step"] for r in read_log(resumed.log_path) if r["event"] == "step"]
    assert steps == list(range(1, 13))


def test_resuming_past_max_iters_says_so(tiny):
    Trainer(tiny(max_iters=4)).train()
    with pytest.raises(ValueError, match="is at step 4, past max_iters \\(2\\)"):
        Trainer(tiny(max_iters=2), resume=tiny().out_dir + "/last")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny):
    trainer = Trainer(tiny(max_iters=8, eval_interval=2))
    good = {}

    def poison(event, info):
        if event == "step" and info["step"] == 3:  # last checkpoint: step 2
            good.update(weights(trainer.model))
            trainer.loss_fn.forward = lambda logits, targets: float("nan")

    trainer.report = poison
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    message = str(err.value)
    assert "the loss is nan at step 4" in message
    assert f"last good checkpoint, {trainer.last_dir} (step 2), is kept" in message
    ck = checkpoint.load(trainer.last_dir)
    assert ck.trainer_state["step"] == 2
    assert all(np.isfinite(w).all() for w in ck.model.state_dict().values())
    assert trainer.step == 3 and all(np.array_equal(good[k], v)
                                     for k, v in weights(trainer.model).items())  # no update
    assert read_log(trainer.log_path)[-1]["event"] == "diverged"


def test_a_huge_learning_rate_diverges_with_a_clear_message(tiny):
    trainer = Trainer(tiny(lr=1e8, min_lr=0.0, warmup_iters=0, grad_clip=0.0, max_iters=50,
                           eval_interval=50))
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match="is (nan|inf) at step"):
        trainer.train()
    assert checkpoint.read_trainer_state(trainer.last_dir)["step"] == 0


def test_an_existing_run_is_not_overwritten_by_accident(tiny):
    Trainer(tiny(max_iters=1)).train()
    with pytest.raises(ValueError, match="already holds a run .*--resume, --overwrite"):
        Trainer(tiny(max_iters=1))
    Trainer(tiny(max_iters=1), overwrite=True).train()


def test_resume_refuses_a_different_model(tiny):
    first = Trainer(tiny(max_iters=1))
    first.train()
    with pytest.raises(ValueError, match="different model or tokenizer: d_model 16 -> 32"):
        Trainer(tiny(d_model=32), resume=first.last_dir)


def test_a_fresh_run_refuses_a_directory_of_other_files(tiny, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.jsonl").write_text("my own notes\n")
    for overwrite in (False, True):  # --overwrite is about runs, not about other files
        with pytest.raises(ValueError, match="mine is not empty and holds no tinylm run"):
            Trainer(tiny(out_dir=str(mine)), overwrite=overwrite)
    assert sorted(p.name for p in mine.iterdir()) == ["log.jsonl"]  # not even a .lock
    assert (mine / "log.jsonl").read_text() == "my own notes\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    Trainer(tiny(out_dir=str(empty), max_iters=1)).train()  # an empty directory is fine


def test_a_run_directory_without_a_checkpoint_is_reused(tiny):
    """A run killed while tokenizing leaves .lock and the token cache: still a run."""
    trainer = Trainer(tiny(max_iters=1))
    trainer.close()  # as if killed before its first checkpoint
    assert sorted(p.name for p in trainer.out_dir.iterdir()) == [".lock", "tokens.json",
                                                                  "tokens.npy"]
    assert Trainer(tiny(max_iters=1)).train()["step"] == 1


def test_one_run_per_directory(tiny):
    first = Trainer(tiny(max_iters=2))
    with pytest.raises(RunDirectoryBusy, match=f"run is in use by another tinylm run "
                                               f"\\(pid {os.getpid()}; lock file .*run/.lock"):
        Trainer(tiny(max_iters=2), overwrite=True)
    first.train()  # unaffected; the lock goes when train() ends
    assert Trainer(tiny(max_iters=4), resume=first.last_dir).train()["step"] == 4


def test_leftovers_of_a_killed_save_are_removed(tiny):
    Trainer(tiny(max_iters=2)).train()
    run = Path(tiny().out_dir)
    (run / "last.tmp").mkdir()
    (run / "last.tmp" / "model.npz").write_bytes(b"half a file")
    (run / "loss.png.tmp").write_bytes(b"half a plot")
    Trainer(tiny(max_iters=4), resume=run / "last").train()
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize("name", ["last", "best", "log.jsonl", "tokens.npy"])
def test_a_symlink_in_the_run_directory_is_refused_before_training(tiny, tmp_path, name):
    """checkpoint.save cannot replace a linked last/ ("Cannot call rmtree on a symbolic
    link"): every save would fail and the steps since the last one be lost."""
    Trainer(tiny(max_iters=2)).train()
    run = Path(tiny().out_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / name).rename(elsewhere / name)
    (run / name).symlink_to(elsewhere / name)
    resume = elsewhere / "last" if name == "last" else run / "last"
    with pytest.raises(ValueError, match=f"run/{name} is a symbolic link"):
        Trainer(tiny(max_iters=4), resume=resume)


def test_a_failed_save_keeps_the_previous_checkpoint(tiny, monkeypatch):
    real = checkpoint.save
    calls = []

    def disk_full_at_step_4(path, model, optimizer, tokenizer, state):
        calls.append(state["step"])
        if state["step"] == 4:
            (path.with_name(path.name + ".tmp")).mkdir()  # what a real save starts with
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, model, optimizer, tokenizer, state)

    monkeypatch.setattr(checkpoint, "save", disk_full_at_step_4)
    trainer = Trainer(tiny(max_iters=8, eval_interval=2))
    with pytest.raises(OSError) as err:
        trainer.train()
    message = str(err.value)
    assert "No space left on device: training stopped at step 4" in message
    assert f"the last good checkpoint, {trainer.last_dir} (step 2), is kept" in message
    assert f"tinylm train --resume {trainer.out_dir}" in message
    assert checkpoint.read_trainer_state(trainer.last_dir)["step"] == 2
    assert not list(trainer.out_dir.glob("*.tmp"))


def test_trainer_json_cannot_make_resume_read_another_file(tmp_path, text_file, capsys):
    """A checkpoint is a file from anywhere: its saved config must not make a resumed run
    read (and train on, and print samples of) a file of the checkpoint's choosing."""
    out = tmp_path / "run"
    assert main(tiny_args(text_file, out) + ["--max-iters", "2", "--samples", "0"]) == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT " * 100)
    state_file = out / "last" / "trainer.json"
    state = json.loads(state_file.read_text())
    state["config"]["data"] = str(secret)
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--max-iters", "4", "--samples", "0"]) == 2
    out_text, err = capsys.readouterr()
    assert err.count("\n") == 1 and "is not the file this run was trained on" in err
    assert f"{state_file}" in err and "--data FILE" in err
    assert "SECRET" not in out_text + err.replace(str(secret), "")
    # the data given on the command line is the user's own choice
    assert main(["train", "--resume", str(out), "--max-iters", "4", "--samples", "0",
                 "--data", str(text_file), "--no-progress"]) == 0


@pytest.mark.parametrize("key, value, message", [
    ("step", -1, "step"), ("step", "3", "step"), ("step", True, "step"),
    ("last_eval", [1, 2], "last_eval"), ("best_val_loss", "low", "best_val_loss"),
    ("rng", {"batches": [1, 2], "eval": None, "dropout": []}, "rng"),
])
def test_a_damaged_trainer_state_is_one_line_naming_the_file(tmp_path, text_file, capsys,
                                                            key, value, message):
    out = tmp_path / "run"
    assert main(tiny_args(text_file, out) + ["--max-iters", "2", "--samples", "0"]) == 0
    state_file = out / "last" / "trainer.json"
    state = json.loads(state_file.read_text())
    state[key] = value
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--max-iters", "4", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(state_file) in err and message in err, err


def test_out_dir_naming_a_file_is_one_line(tmp_path, text_file, capsys):
    assert main(tiny_args(text_file, text_file)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out_dir names a file, not a directory" in err


def test_generate_finds_a_run_s_checkpoint_as_resume_does(tiny, capsys):
    """A save cut off between its renames leaves only "<name>.old": both commands use it."""
    trainer = Trainer(tiny(max_iters=2))
    trainer.train()
    trainer.best_dir.rename(trainer.best_dir.with_name("best.old"))
    trainer.last_dir.rename(trainer.last_dir.with_name("last.old"))
    assert main(["generate", "--checkpoint", str(trainer.out_dir), "--max-new-tokens", "5",
                 "--seed", "0"]) == 0
    assert Trainer(tiny(max_iters=4), resume=trainer.last_dir).train()["step"] == 4


# -- best checkpoint, log, plot -------------------------------------------------------------


def test_best_checkpoint_log_and_plot(tiny):
    trainer = Trainer(tiny(max_iters=12, eval_interval=3, lr=3e-3))
    result = trainer.train()
    records = read_log(trainer.log_path)
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(steps) == 12 and {"loss", "lr", "grad_norm", "tokens_per_s"} <= steps[0].keys()
    assert [r["step"] for r in evals] == [0, 3, 6, 9, 12]
    best = min(evals, key=lambda r: r["val_loss"])
    assert result["best_val_loss"] == best["val_loss"]
    assert checkpoint.read_trainer_state(trainer.best_dir)["step"] == best["step"]
    assert result["val_loss"] == evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert trainer.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trainer.out_dir / "tokens.npy").is_file()


def test_trains_on_the_cuda_path_and_the_checkpoint_loads_on_cpu(tiny, fake_cuda):
    trainer = Trainer(tiny(device="cuda", max_iters=2, eval_interval=2))
    trainer.train()
    assert backend.xp_of(next(trainer.model.parameters())[1]) is fake_cuda
    with backend.use_cupy(None):
        ck = checkpoint.load(trainer.last_dir)
    assert ck.trainer_state["step"] == 2


# -- the command line -----------------------------------------------------------------------


def tiny_args(text_file, out):
    return ["train", "--data", str(text_file), "--out", str(out), "--no-progress",
            "--set", "context_length=16", "--set", "d_model=16", "--set", "n_layers=1",
            "--set", "n_heads=2", "--set", "batch_size=4", "--set", "eval_interval=2",
            "--set", "eval_iters=2", "--set", "warmup_iters=1"]


def test_train_command_reports_saves_and_samples(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(text_file, out) + ["--max-iters", "4", "--sample-tokens", "20"]) == 0
    text = capsys.readouterr().out
    assert "tinylm train: preset shakespeare-char-cpu" in text
    assert "max_iters              4  *" in text and "weight_decay           0.1" in text
    assert "val loss" in text and "val perplexity" in text and "--- sample 2 ---" in text
    assert checkpoint.load(out / "best").tokenizer.vocab_size == len(set(SHAKESPEARE[:20_000]))

    # continue the same run for more steps
    assert main(tiny_args(text_file, out) + ["--resume", "--max-iters", "6", "--samples", "0"]) == 0
    text = capsys.readouterr().out
    assert f"resuming {out / 'last'}" in text and "done: step 6" in text


def test_json_config_and_presets(tmp_path, text_file, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "shakespeare-bpe", "vocab_size": 300, "lr": 0.002}))
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "preset shakespeare-bpe" in text and '"bpe"' in text and "0.002  *" in text
    assert main(["train", "--config", "shakespeare-char", "--dry-run"]) == 0  # a preset name
    text = capsys.readouterr().out
    assert "preset shakespeare-char " in text and "n_layers               6" in text
    cfg.write_text(json.dumps({"learning_rate": 1}))
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown TrainConfig field learning_rate" in err
    assert "valid fields:" in err and "lr" in err


@pytest.mark.parametrize("argv, message", [
    (["--set", "nope=1"], "unknown TrainConfig field nope"),
    (["--set", "lr=fast"], "lr must be a float"),
    (["--set", "lr"], "--set expects KEY=VALUE"),
    (["--set", "n_heads=3"], "divisible"),
    (["--data", "/no/such.txt"], "data file not found"),
    (["--resume", "/no/such/run"], "no checkpoint to resume"),
    (["--device", "cuda"], "needs CuPy"),
])
def test_bad_arguments_are_one_line(argv, message, tmp_path, capsys):
    with backend.use_cupy(None):
        assert main(["train", "--out", str(tmp_path / "r"), "--no-progress"] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_non_utf8_data_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\n\xff\xfe world\n")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.txt is not UTF-8 text" in err and "byte offset 6" in err


def test_ctrl_c_in_the_command_exits_130_with_a_checkpoint(tmp_path, text_file, capsys,
                                                         monkeypatch):
    real = Trainer.train_step

    def interrupted_at_3(self):
        info = real(self)
        if self.step == 3:
            raise KeyboardInterrupt
        return info

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_3)
    assert main(tiny_args(text_file, tmp_path / "run") + ["--max-iters", "6"]) == 130
    assert "continue with: tinylm train --resume" in capsys.readouterr().out
    assert checkpoint.read_trainer_state(tmp_path / "run" / "last")["step"] == 3


def test_help_explains_every_option_and_field():
    parser = build_parser("train")
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    text = sub.format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name} = " in text, f.name
    for option in ("--preset", "--config", "--set", "--data", "--out", "--device", "--resume",
                   "--max-iters", "--samples"):
        assert option in text
    for name in PRESETS:
        assert name in text
    out = subprocess.run([sys.executable, "-m", "tinylm", "train", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "shakespeare-char-cpu" in out.stdout


def test_variant_presets_switch_the_architecture():
    llama, moe = PRESETS["shakespeare-char-llama"], PRESETS["shakespeare-char-moe"]
    assert (llama.pos, llama.norm, llama.mlp, llama.n_kv_heads, llama.bias,
            llama.tie_weights) == ("rope", "rmsnorm", "swiglu", 2, False, False)
    assert (moe.sliding_window, moe.n_experts, moe.experts_per_token) == (32, 4, 2)
    # everything else is the CPU recipe, so the runs compare
    same = [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in ("pos", "norm", "mlp", "n_kv_heads", "bias", "tie_weights",
                              "sliding_window", "n_experts", "experts_per_token", "mlp_hidden",
                              "out_dir")]
    cpu = PRESETS["shakespeare-char-cpu"]
    assert [getattr(llama, f) for f in same] == [getattr(cpu, f) for f in same]
    assert [getattr(moe, f) for f in same] == [getattr(cpu, f) for f in same]


def test_moe_run_logs_the_aux_loss_and_resumes_bitwise(tiny):
    config = tiny(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=1, sliding_window=6,
                  n_experts=3, experts_per_token=2, bias=False, tie_weights=False, max_iters=6)
    straight = Trainer(config.replace(out_dir=config.out_dir + "-straight"))
    straight.train()
    records = [r for r in read_log(straight.log_path) if r["event"] == "step"]
    assert all(r["aux_loss"] > 0 for r in records)  # the load-balancing loss is optimised

    stopper = StopAt(3)
    first = Trainer(config, reporter=stopper)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = Trainer(config, resume=first.last_dir)
    resumed.train()
    assert_bitwise_equal(straight, resumed)
    with pytest.raises(ValueError, match="n_experts 3 -> 4"):
        Trainer(config.replace(n_experts=4), resume=first.last_dir)


def test_checkpoints_from_before_the_variants_resume(tiny):
    """trainer.json written before the variant fields existed lacks them: they were the
    GPT-2 defaults then, and resuming with the defaults must be accepted."""
    config = tiny(max_iters=4)
    stopper = StopAt(2)
    first = Trainer(config, reporter=stopper)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    path = first.last_dir / "trainer.json"
    state = json.loads(path.read_text())
    for name in ("pos", "norm", "mlp", "n_kv_heads", "sliding_window", "n_experts"):
        del state["config"][name]
    path.write_text(json.dumps(state))
    assert Trainer(config, resume=first.last_dir).train()["step"] == 4
