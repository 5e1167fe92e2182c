"""The trainer and `tinylm train`: presets, configuration, accumulation, schedule,
bitwise resume, Ctrl-C, divergence, best checkpoint, log and plot, the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import typing

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
    assert ("interrupted", {"step": stop, "path": str(first.last_dir)}) in stopper.events
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
