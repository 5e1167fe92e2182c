"""Faults a long unattended run meets, each in a real `tinylm train` process:
kill -9, Ctrl-C and SIGTERM at random moments, a full disk, a second run into the
same directory, a read-only directory. After each: nothing lost that was saved,
nothing left behind, one line saying what happened, and `--resume` ends with
bitwise the weights of a run that was never interrupted (docs/safety.md).
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinylm import checkpoint
from tinylm.data import bundled_text_path
from tinylm.training.rundir import read_log

# Steps of milliseconds: a run is mostly Python's start-up and its nine checkpoints.
TINY = ["--set", "max_iters=40", "eval_interval=5", "d_model=16", "n_layers=1", "n_heads=2",
        "context_length=16", "batch_size=4", "eval_iters=2", "dropout=0.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("TINYLM_DEBUG", None)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(bundled_text_path().read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def command(*args) -> list[str]:
    return [sys.executable, "-m", "tinylm", *map(str, args)]


def fresh(data_file, out, *extra) -> list[str]:
    """A new run; `extra` after TINY (so "--set max_iters=N" there wins: --set comes last)."""
    return command("train", "--data", data_file, "--out", out, "--samples", "0",
                   "--no-progress", *TINY, *extra)


def resume(out, *extra) -> list[str]:
    return command("train", "--resume", out, "--samples", "0", "--no-progress", *extra)


def run(argv, *, preexec_fn=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout,
                          preexec_fn=preexec_fn)


def weights(ckpt_dir) -> dict:
    with np.load(Path(ckpt_dir) / "model.npz") as z:
        return {name: z[name] for name in z.files}


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))


def one_line_error(proc) -> str:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("tinylm train: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def reference(data_file, tmp_path_factory):
    """An uninterrupted run: (its directory, its wall time in seconds)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    start = time.perf_counter()
    proc = run(fresh(data_file, out))
    assert proc.returncode == 0, proc.stderr
    return out, time.perf_counter() - start


# -- signals --------------------------------------------------------------------------

# the exit codes a signal may give: its own handling (130, 143), the default action when
# it lands before the handlers are installed (-2, -15, during the imports), or 0 when
# the run ended first
EXPECTED = {signal.SIGKILL: {-9, 0}, signal.SIGINT: {130, -2, 0}, signal.SIGTERM: {143, -15, 0}}


def next_run(data_file, out) -> list[str]:
    """What a user does after a stop: resume if a checkpoint survived, else start again."""
    return resume(out) if checkpoint.is_checkpoint(out / "last") else fresh(data_file, out)


def stop_after(argv, sig, delay: float) -> tuple[int, str]:
    """Run argv, send it `sig` after `delay` seconds; (exit code, stderr)."""
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=ENV)
    time.sleep(delay)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    return child.returncode, err


def test_stopped_at_random_moments_resume_ends_bitwise_as_an_uninterrupted_run(
        data_file, reference, tmp_path):
    """Each round stops a run twice (the second time while it resumes), at moments drawn
    from the imports to the last save, then lets it finish."""
    ref, seconds = reference
    rng = random.Random(1337)  # random moments, the same ones every time the test runs
    signals = [signal.SIGKILL, signal.SIGINT, signal.SIGTERM] * 6
    rng.shuffle(signals)
    for round_ in range(8):
        out = tmp_path / f"run{round_}"
        for _ in range(2):
            sig, delay = signals.pop(), rng.uniform(0.2, 1.1) * seconds
            code, err = stop_after(next_run(data_file, out), sig, delay)
            what = f"round {round_}: {sig.name} after {delay:.2f}s"
            assert code in EXPECTED[sig], (what, code, err)
            if code in (130, 143):
                assert err in ("tinylm train: interrupted\n",
                               f"tinylm train: stopped by {sig.name}\n"), (what, err)
            if checkpoint.is_checkpoint(out / "last"):  # the last good checkpoint loads
                assert 0 <= checkpoint.load(out / "last").trainer_state["step"] <= 40, what

        proc = run(next_run(data_file, out))
        assert proc.returncode == 0, (what, proc.stderr)
        assert checkpoint.read_trainer_state(out / "last")["step"] == 40, what
        assert_same_weights(ref / "last", out / "last")
        assert_same_weights(ref / "best", out / "best")
        steps = [r["step"] for r in read_log(out / "log.jsonl") if r["event"] == "step"]
        assert steps == list(range(1, 41)), what  # the log reads as one run
        assert not leftovers(out), what  # a killed save's are cleared by the next run


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def evaluated(out: Path) -> bool:
    return any(r.get("event") == "eval" and r["step"] > 0 for r in read_log(out / "log.jsonl"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_last_then_exit(data_file, tmp_path, sig, code):
    out = tmp_path / "run"
    child = subprocess.Popen(fresh(data_file, out, "--set", "max_iters=100000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: evaluated(out))
        child.send_signal(sig)
        stdout, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert err == f"tinylm train: {'interrupted' if code == 130 else 'stopped by SIGTERM'}\n"
    stopped = read_log(out / "log.jsonl")[-1]
    assert stopped["event"] == "interrupted" and stopped["signal"] == sig.name
    assert checkpoint.load(out / "last").trainer_state["step"] == stopped["step"] > 0
    assert f"saved the state after step {stopped['step']}" in stdout
    assert not leftovers(out)


# -- a full disk ------------------------------------------------------------------------


def file_size_limit(limit: int):
    """preexec_fn: files may grow to `limit` bytes, as on a disk that fills up. Writes
    beyond fail with EFBIG; SIGXFSZ, which would kill the child first, is ignored."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_file(
        data_file, reference, tmp_path):
    out = tmp_path / "run"
    assert run(fresh(data_file, out, "--set", "max_iters=10")).returncode == 0
    kept = weights(out / "last")

    # the checkpoint's optimizer.npz (~40 kB) no longer fits; the log (~5 kB) still does
    proc = run(resume(out, "--max-iters", "40"), preexec_fn=file_size_limit(30_000))
    err = one_line_error(proc)
    assert "File too large: training stopped at step 15" in err
    assert f"the last good checkpoint, {out / 'last'} (step 10), is kept" in err
    assert not leftovers(out)
    saved = checkpoint.load(out / "last")
    assert saved.trainer_state["step"] == 10
    assert all(np.array_equal(kept[k], v) for k, v in saved.model.state_dict().items())

    # once there is room again the run continues, to the uninterrupted run's weights
    assert run(resume(out, "--max-iters", "40")).returncode == 0
    assert_same_weights(reference[0] / "last", out / "last")


def test_a_full_disk_while_tokenizing_is_one_line(data_file, tmp_path):
    out = tmp_path / "run"
    proc = run(fresh(data_file, out), preexec_fn=file_size_limit(10_000))  # tokens.npy: 40 kB
    err = one_line_error(proc)
    assert "File too large" in err and str(out) in err
    assert not leftovers(out) and not checkpoint.is_checkpoint(out / "last")
    assert run(fresh(data_file, out, "--set", "max_iters=5")).returncode == 0  # same directory


# -- two runs, one directory ----------------------------------------------------------


def test_a_second_run_into_the_same_directory_is_refused(data_file, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(fresh(data_file, out, "--set", "max_iters=1000000",
                                   "eval_interval=50"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: (out / "log.jsonl").exists())  # the lock is held before the log
        for argv in (fresh(data_file, out, "--overwrite"), resume(out)):
            err = one_line_error(run(argv))
            assert f"{out} is in use by another tinylm run (pid {first.pid}" in err
        assert first.poll() is None  # unaffected: still training
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143, first_err
    records = read_log(out / "log.jsonl")
    stopped = checkpoint.read_trainer_state(out / "last")["step"]
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, stopped + 1))
    assert [r["event"] for r in records].count("start") == 1  # one run wrote this log

    # the lock dies with its holder: a run killed with -9 does not block the next one
    killed = subprocess.Popen(resume(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=ENV)
    wait_for(lambda: len(read_log(out / "log.jsonl")) > len(records))
    killed.kill()
    killed.wait()
    step = checkpoint.read_trainer_state(out / "last")["step"]
    assert run(resume(out, "--max-iters", step + 5)).returncode == 0


# -- a directory that cannot be written ------------------------------------------------


def without_write_permission(argv: list[str]) -> list[str]:
    """argv run without the right to write where the file modes say no. As root (CI),
    chmod does not stop writes; dropping the capabilities that bypass modes does."""
    if os.geteuid() != 0:
        return argv
    drop = [shutil.which("setpriv") or "setpriv",
            "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    try:  # a container may forbid changing the bounding set
        usable = subprocess.run([*drop, "true"], capture_output=True).returncode == 0
    except OSError:
        usable = False
    if not usable:
        pytest.skip("running as root without a usable setpriv: file modes cannot be enforced")
    return [*drop, *argv]


def test_a_read_only_run_directory_is_one_line_and_untouched(data_file, tmp_path):
    out = tmp_path / "run"
    assert run(fresh(data_file, out, "--set", "max_iters=5")).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    out.chmod(0o555)
    try:
        proc = run(without_write_permission(resume(out, "--max-iters", "10")))
        err = one_line_error(proc)
        assert f"{out}: " in err and "not writable" in err
        empty = tmp_path / "empty"
        empty.mkdir(mode=0o555)
        proc = run(without_write_permission(fresh(data_file, empty)))
        assert "not writable" in one_line_error(proc)
    finally:
        out.chmod(0o755)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
