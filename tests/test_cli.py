"""The command line: exit codes, one-line errors, help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tinylm.bench import bench_config, flops_per_token
from tinylm.cli import main


def test_gradcheck_command_passes(capsys):
    assert main(["gradcheck", "--only", "Linear"]) == 0
    out = capsys.readouterr().out
    assert "Linear" in out and "2 passed, 0 failed" in out


def test_gradcheck_command_unknown_case_is_an_error(capsys):
    assert main(["gradcheck", "--only", "no-such-layer"]) == 2
    assert "no gradcheck case matches" in capsys.readouterr().err


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "tinylm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("gradcheck", "bench", "tokenizer"):
        assert cmd in out.stdout


def test_bad_argument_is_one_line_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "tinylm", "bench", "--config", "huge"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice: 'huge'" in out.stderr and "Traceback" not in out.stderr


def test_bench_json_into_a_directory_is_refused_before_benchmarking(tmp_path, capsys):
    assert main(["bench", "--config", "tiny", "--json", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1  # refused before the first benchmark
    assert f"--json {tmp_path}: is a directory; give a file name" in err
    assert main(["bench", "--config", "tiny", "--json", str(tmp_path / "no" / "b.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.parent.glob("*.tmp"))


def test_sigterm_exits_143_after_cleaning_up(capsys, monkeypatch):
    """SIGTERM raises (as Ctrl-C does) so `finally` blocks run: exit 128 + 15."""
    import os
    import signal

    import tinylm.gradcheck

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(tinylm.gradcheck, "run", terminated)
    assert main(["gradcheck"]) == 143
    assert capsys.readouterr().err == "tinylm gradcheck: stopped by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_cuda_without_gpu_is_one_line(monkeypatch, capsys):
    from tinylm import backend

    with backend.use_cupy(None):
        assert main(["gradcheck", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs CuPy and a CUDA GPU" in err


def test_bench_config_reports_a_training_step():
    r = bench_config("tiny", steps=1, warmup=0, device="cpu")
    assert r["config"] == "tiny" and r["tokens_per_s"] > 0 and r["params"] > 0
    assert r["final_loss"] == pytest.approx(5.55, abs=0.3)  # ~ln(256) at initialisation


def test_flops_formula():
    # training FLOPs per token: 6 * (12 L d^2 + d V) + 12 L T d (L layers, T context)
    expected = 6 * (12 * 4 * 128**2 + 128 * 512) + 12 * 4 * 128 * 128
    assert flops_per_token(V=512, d=128, L=4, T=128) == expected
