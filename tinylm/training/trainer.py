"""The Trainer: one step, evaluation, the loop, and resuming.

One optimizer step (`Trainer.train_step`), with k = grad_accum_steps micro-batches:

    lr = cosine_schedule(step)                          warmup, then cosine to min_lr
    zero grads
    k times:  x, y = random windows;  loss = CE(model(x), y)
              backward(loss / k)                        grads add up (+=) to the mean
    clip_grad_norm(grad_clip);  AdamW step

Every eval_interval steps (and at the end) the mean loss over eval_iters random
batches of each split is measured, as nanoGPT's `estimate_loss`, so numbers are
comparable with its published ones; then the run directory (rundir.py) gets its
last/ and best/ checkpoints, a log record and a new loss plot.

Resuming restores everything a step depends on (weights, AdamW moments and step
count, the batch sampler's and every dropout layer's random generator, the eval
generator), so on the CPU a resumed run ends with bitwise the same weights as an
uninterrupted one (resume.py).

Data-parallel (`comm`, tinylm.distributed; `mpirun -n N tinylm train`): every rank
draws the same global batch and trains on its rows; the gradients are all-reduced
once per step, so the update is one process's. Rank 0 alone reports and writes the
run directory; the other ranks read it (the token cache, a checkpoint to resume).

Around the loop, in their own files: opening.py (the checks before a run writes
anything, the lock, and building what the Trainer holds) and saving.py (writing a
checkpoint; an interrupt's save; the errors for a full disk and for divergence).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from tinylm.backend import resolve_device, to_device
from tinylm.data import Batches, get_batch, prepare
from tinylm.distributed import (
    SingleProcess,
    agreed_stop,
    broadcast_parameters,
    run_on_root,
    shard_batch,
)
from tinylm.model import GPT
from tinylm.optim import AdamW, clip_grad_norm, cosine_schedule
from tinylm.training.config import TrainConfig
from tinylm.training.lock import NoLock
from tinylm.training.memory import check_step_memory
from tinylm.training.opening import claim, open_run
from tinylm.training.resume import capture_state, restore_state
from tinylm.training.rundir import ReaderRunDir, RunDir
from tinylm.training.saving import (
    TrainingDiverged,
    diverged,
    save_on_interrupt,
    write_checkpoint,
    write_failed,
)
from tinylm.training.signals import DeferredInterrupt, StopRequested

# TrainingDiverged lives in saving.py, with the other errors that stop a run; it is
# imported from here as well (tinylm.train re-exports it from this module).
__all__ = ["Trainer", "TrainingDiverged"]


class Trainer:
    """Trains a GPT as `config` says. Library code: it prints nothing.

    `reporter(event, info)` is told what happens (the command line prints it):
      "data"         {"message"}: tokenizer training, tokenization
      "start"        {"step", "max_iters", "params", "device", "train_tokens", "val_tokens",
                      "tokenizer", "resumed_from", "world_size"}
      "step"         {"step", "loss", "lr", "grad_norm", "tokens_per_s", "dt"} after each step
                     (and "aux_loss", the load-balancing loss, for MoE models; "comm_s",
                     the seconds spent in collectives, with N > 1 processes)
      "eval"         {"step", "train_loss", "val_loss", "val_ppl", "best"}
      "checkpoint"   {"path", "step", "kind"} ("last" or "best")
      "interrupted"  {"step", "path"} (path None when no checkpoint could be written)
      "end"          the dict `train()` returns
    A reporter may raise KeyboardInterrupt to stop the run as Ctrl-C does.

    `resume`: a checkpoint (directory or `checkpoint.Checkpoint`) written by a
    Trainer; the run continues from it. Otherwise an existing checkpoint in
    out_dir is an error unless `overwrite=True`; so is, always, a non-empty out_dir
    that holds no run (its files would be replaced).

    The Trainer locks out_dir (lock.py) from construction until train() returns or
    raises (or close()): a second Trainer, in this process or another, is refused.

    `comm`: a tinylm.distributed communicator joining N processes (ranks) that train
    data-parallel, each constructing its Trainer alike; None is one process. Only rank
    0 reports, locks and writes; an error it meets is raised by every rank together.
    """

    def __init__(self, config: TrainConfig, *, reporter=None, resume=None,
                 overwrite: bool = False, comm=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.comm = comm if comm is not None else SingleProcess()
        self.is_root = self.comm.rank == 0
        self.report = (reporter if self.is_root else None) or (lambda event, info: None)
        self.run_dir = run = (RunDir if self.is_root else ReaderRunDir)(cfg.out_dir)
        self.out_dir, self.last_dir, self.best_dir = run.path, run.last_dir, run.best_dir
        self.log_path, self.plot_path = run.log_path, run.plot_path
        self.device = resolve_device(cfg.device)
        # Rank 0 checks, locks and prepares the run directory (it writes the token cache)
        # before the others read it; they get its tokenizer rather than train another.
        # The rest (opening.py) sets what the loop uses: data, tokenizer, model, loss_fn,
        # precision, scaler, optimizer, batches, eval_rng, and the counters (step, ...).
        tokenizer = run_on_root(self.comm, lambda: claim(self, resume, overwrite))
        if not self.is_root:
            self._lock = NoLock()
            open_run(self, resume, overwrite, tokenizer)
        broadcast_parameters(self.model.parameters(), self.comm)  # equal on every rank

    # -- the parts a subclass may replace (tinylm/finetune: chats, preference pairs) -----

    def _prepare_data(self, ckpt, tokenizer):
        """The data: an object with .tokenizer, .train, .val and .describe() (tinylm.data)."""
        cfg = self.config
        return prepare(
            cfg.data, ckpt.tokenizer if ckpt is not None else tokenizer or cfg.tokenizer,
            self.out_dir,
            vocab_size=cfg.vocab_size, train_chars=cfg.tokenizer_train_chars,
            val_fraction=cfg.val_fraction, min_tokens=cfg.context_length + 1,
            report=lambda message: self.report("data", {"message": message}))

    def _build_model(self, ckpt):
        """The model to train: the checkpoint's when resuming, else a new one."""
        if ckpt is not None:
            return ckpt.model
        cfg = self.config
        check_step_memory(cfg, self.tokenizer.vocab_size, self.device)
        return GPT(cfg.gpt_config(self.tokenizer.vocab_size), seed=cfg.seed,
                   device=self.device, dtype=cfg.dtype)

    def _make_batches(self):
        """The training batch sampler: `next()`, and `state_dict()` holding its "rng"."""
        cfg = self.config
        return Batches(self.data.train, cfg.context_length, cfg.batch_size, seed=[cfg.seed, 1])

    def _restore(self, ckpt) -> None:
        """Continue from `ckpt`: AdamW's state, the counters, the generators (resume.py)."""
        restore_state(self, ckpt)

    def eval_batch(self, split: str):
        """One random evaluation batch (x, y) of `split` ("train" or "val")."""
        cfg = self.config
        tokens = self.data.train if split == "train" else self.data.val
        return get_batch(tokens, cfg.context_length, cfg.batch_size, self.eval_rng)

    def forward_backward(self, dscale: float) -> tuple[float, float]:
        """One micro-batch: draw it, then forward, loss, and backward with the loss's
        gradient scaled by w * dscale (the gradients accumulate, +=); returns (its loss,
        w), w being this rank's weight in the batch's mean (1.0 for one process)."""
        xp = self.model.xp
        x, y = self.batches.next()  # (B, T) each, on the host: the global batch
        x, y, w = shard_batch(x, y, self.comm.rank, self.comm.size)  # this rank's rows
        # forward, loss and backward (in fp16/bf16 as precision.py says; fp32: as is)
        loss = self.precision.forward_backward(
            self.model, self.loss_fn, to_device(x, xp), to_device(y, xp),
            dloss=dscale * w, daux=dscale * w)
        return loss, w

    def close(self) -> None:
        """Let go of the run directory's lock (train() does, when it returns or raises)."""
        self._lock.release()

    # -- the loop ---------------------------------------------------------------------

    def train(self) -> dict:
        """Train to max_iters (evaluating, saving, logging); returns the final numbers.

        Ctrl-C, SIGTERM or SIGHUP (or a KeyboardInterrupt from the reporter) saves
        out_dir/last at the last completed step and re-raises (a signal as
        StopRequested, a KeyboardInterrupt that knows its signal: signals.py). A
        non-finite loss raises TrainingDiverged; a failed write (a full disk) an
        OSError saying which checkpoint is kept.
        """
        cfg = self.config
        self._lock.acquire()  # again, for a second train() (a no-op while held)
        try:
            self._start()
            with DeferredInterrupt() as stop:  # SIGINT, SIGTERM, SIGHUP: stop at a boundary
                while True:
                    if self._eval_due():
                        self._evaluate_and_save()
                    self._stop_if_requested(stop)
                    if self.step >= cfg.max_iters:
                        break
                    info = self.train_step()
                    if self.step % cfg.log_interval == 0:
                        self.run_dir.log({"event": "step", **info, "time_s": self._elapsed()})
                    self.report("step", info)
        except KeyboardInterrupt as exc:
            # N ranks save together only at a stop they agreed on; any other interrupt
            # may have caught them in different places (abort_on_failure ends the job)
            if self.comm.size == 1 or getattr(exc, "agreed", False):
                save_on_interrupt(self, getattr(exc, "signal_name", "SIGINT"))
            raise
        except OSError as exc:  # a full disk, a directory made read-only: say what is kept
            raise write_failed(self, exc) from exc
        finally:
            self.elapsed_s, self._clock = self._elapsed(), None
            self._lock.release()
        result = self.result()
        self.report("end", result)
        return result

    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns its numbers."""
        cfg = self.config
        t0, comm_s = time.perf_counter(), self.comm.stats["seconds"]
        lr = self.lr_at(self.step)
        self.optimizer.lr = lr
        self.model.zero_grad()
        k, size = cfg.grad_accum_steps, self.comm.size
        loss_sum = aux_sum = 0.0
        scale = 1.0 if self.scaler is None else self.scaler.scale  # fp16's loss scale
        for _ in range(k):
            # Each micro-batch's loss is a mean over its B*T tokens; scaling its gradient
            # by 1/k makes the accumulated (+=) gradients the mean over all k*B*T tokens:
            # exactly the gradient of one batch k times larger. A MoE model optimises
            # loss + aux_loss (load balancing), whose gradient is scaled the same way;
            # the loss reported is the cross-entropy alone, comparable across variants.
            # With N ranks, w = N * (this rank's tokens) / (the batch's): the all-reduce's
            # average of the ranks' weighted means is then the whole batch's mean.
            loss, w = self.forward_backward(scale / k)  # draw, forward, backward (grads +=)
            if size == 1 and not math.isfinite(loss):
                raise diverged(self, f"the loss is {loss}", lr)
            loss_sum += w * loss / size
            aux_sum += w * self.model.aux_loss / size
        if size > 1:  # the global batch's losses, the same numbers on every rank
            loss_sum, aux_sum = self.comm.allreduce_floats([loss_sum, aux_sum])
            if not math.isfinite(loss_sum):
                raise diverged(self, f"the loss is {loss_sum / k}", lr)
        finite = True
        if self.scaler is not None:  # divide the scale out; an inf or NaN skips the step
            finite = self.scaler.unscale_(self.model.parameters())
            if size > 1:  # every rank skips, or none does
                finite = self.comm.allreduce_floats([0.0 if finite else 1.0])[0] == 0.0
        norm = None
        if finite:
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure only
            if isinstance(self.optimizer, AdamW):  # one process
                norm = clip_grad_norm(self.model.parameters(), max_norm)
            else:  # N processes: the gradient all-reduce, once per step, then the global clip
                norm = self.optimizer.reduce_and_clip(max_norm)
            if not math.isfinite(norm):
                raise diverged(self, f"the gradient norm is {norm}", lr)
        self._updating = True  # an interrupt from here to the snapshot cannot be saved
        if finite:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(finite)  # an overflow halves the scale: the step was skipped
        self.step += 1
        self.tokens_seen += k * cfg.batch_size * cfg.context_length
        dt = time.perf_counter() - t0
        self._snapshot = self.trainer_state()
        self._updating = False
        record = {"step": self.step, "loss": loss_sum / k, "lr": lr, "grad_norm": norm,
                  "tokens_per_s": k * cfg.batch_size * cfg.context_length / dt, "dt": dt}
        if cfg.n_experts > 0:
            record["aux_loss"] = aux_sum / k
        if self.scaler is not None:  # grad_norm is None on a skipped step
            record["loss_scale"], record["skipped"] = scale, not finite
        if size > 1:  # seconds in collectives (waiting for the slowest rank included)
            record["comm_s"] = self.comm.stats["seconds"] - comm_s
        return record

    def lr_at(self, step: int) -> float:
        cfg = self.config
        decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
        return cosine_schedule(step, max_lr=cfg.lr, min_lr=cfg.min_lr,
                               warmup_steps=cfg.warmup_iters,
                               decay_steps=max(decay, cfg.warmup_iters))

    def evaluate(self) -> dict:
        """Mean loss over eval_iters random batches of each split (nanoGPT's estimate_loss)."""
        cfg, xp, rank, size = self.config, self.model.xp, self.comm.rank, self.comm.size
        means = {}
        self.model.eval()  # dropout off
        try:
            for split in ("train", "val"):
                losses = []
                for _ in range(cfg.eval_iters):
                    x, y = self.eval_batch(split)
                    x, y, w = shard_batch(x, y, rank, size)  # this rank's rows
                    logits = self.model.forward(to_device(x, xp))
                    losses.append(w / size * self.loss_fn.forward(logits, to_device(y, xp)))
                means[split] = float(np.mean(losses))
        finally:
            self.model.train()
        if size > 1:  # the sum of the ranks' weighted shares: the global batches' means
            means["train"], means["val"] = self.comm.allreduce_floats(
                [means["train"], means["val"]])
        val = means["val"]
        return {"step": self.step, "train_loss": means["train"], "val_loss": val,
                "val_ppl": math.exp(val) if val < 700 else math.inf}

    def result(self) -> dict:
        last = self.last_eval or {}
        best = self.best_val_loss
        return {
            "step": self.step, "train_loss": last.get("train_loss"),
            "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),
            "best_val_loss": best, "best_val_ppl": None if best is None else math.exp(best),
            "elapsed_s": self.elapsed_s, "tokens_seen": self.tokens_seen,
            "last_checkpoint": str(self.last_dir), "best_checkpoint": str(self.best_dir),
            "log": str(self.log_path), "plot": str(self.plot_path),
        }

    # -- around the loop: start, evaluations, saves, interrupts, divergence ------------

    def _start(self) -> None:
        self._clock = (time.perf_counter(), self.elapsed_s)
        self.report("start", {
            "step": self.step, "max_iters": self.config.max_iters,
            "params": self.model.num_parameters(), "device": self.device,
            "train_tokens": len(self.data.train), "val_tokens": len(self.data.val),
            "tokenizer": repr(self.tokenizer), "resumed_from": self.resumed_from,
            "world_size": self.comm.size,
        })
        self.run_dir.log({"event": "start", "step": self.step, "resumed_from": self.resumed_from,
                          "world_size": self.comm.size, "config": self.config.to_dict()})

    def _eval_due(self) -> bool:
        cfg = self.config
        due = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
        return due and (self.last_eval or {}).get("step") != self.step

    def _evaluate_and_save(self) -> None:
        ev = self.evaluate()
        if not math.isfinite(ev["val_loss"]) or not math.isfinite(ev["train_loss"]):
            raise diverged(self, f"the evaluation loss is {ev['val_loss']}",
                           self.lr_at(self.step), step=self.step)
        best = self.best_val_loss is None or ev["val_loss"] < self.best_val_loss
        if best:
            self.best_val_loss = ev["val_loss"]
        self.last_eval = ev
        self._snapshot = self.trainer_state()
        self.run_dir.log({"event": "eval", **ev, "best": best, "time_s": self._elapsed()})
        self.report("eval", {**ev, "best": best})
        # best/ before last/: a run killed between the two saves resumes from the older
        # last/, redoes this evaluation and saves best/ again; the other order would
        # resume past a best checkpoint that was never written.
        if best:
            self.report("checkpoint", {"path": str(self.save(self.best_dir, self._snapshot)),
                                       "step": self.step, "kind": "best"})
        self.report("checkpoint", {"path": str(self.save(self.last_dir, self._snapshot)),
                                   "step": self.step, "kind": "last"})
        self.run_dir.plot()

    def save(self, directory, trainer_state: dict | None = None) -> Path:
        """Write a full checkpoint (weights, tokenizer, AdamW, trainer state) to `directory`.

        checkpoint.save is atomic: if it fails (a full disk), the previous checkpoint is
        untouched; its temporary "<directory>.tmp/" is removed here, so none is left.
        With N ranks every rank calls it: ZeRO-1's optimizer state is gathered from all
        of them; rank 0 writes, and every rank learns whether the write failed."""
        state = self.trainer_state() if trainer_state is None else trainer_state
        directory = Path(directory)
        optimizer = self.optimizer.state_dict() if getattr(self.optimizer, "zero", False) \
            else self.optimizer
        path = run_on_root(self.comm, lambda: self._write(directory, optimizer, state))
        if directory == self.last_dir:
            self.last_saved_step = state["step"]
        return path

    def _write(self, directory: Path, optimizer, state: dict) -> Path:
        """Rank 0's part of `save` (saving.py); tinylm/finetune replaces it."""
        return write_checkpoint(directory, self.model, optimizer, self.tokenizer, state)

    def _stop_if_requested(self, stop: DeferredInterrupt) -> None:
        """Stop here if a signal asked to; with N ranks, if any rank got one: they agree
        at this step boundary, so all of them stop (and save) together."""
        signum = agreed_stop(self.comm, stop.requested)
        if signum is not None:
            exc = StopRequested(signum)
            exc.agreed = self.comm.size > 1
            raise exc

    def trainer_state(self) -> dict:
        """What trainer.json holds: enough, with the weights and AdamW, to continue exactly."""
        return capture_state(self)

    def _elapsed(self) -> float:
        if self._clock is None:
            return self.elapsed_s
        started, before = self._clock
        return before + time.perf_counter() - started
