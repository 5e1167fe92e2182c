"""Opening a run: the checks before anything is written, the lock, and what a Trainer holds.

`Trainer.__init__` (trainer.py) runs these once:

    claim(trainer, resume, overwrite)      rank 0: refuse what cannot work (a step that
                                           cannot fit in memory, a run directory it must
                                           not write), lock out_dir, then open_run
    open_run(trainer, resume, overwrite)   the data, the model, AdamW, the generators and
                                           the counters: every attribute the loop uses;
                                           the other ranks run it on what rank 0 prepared

open_run calls the Trainer's hooks (`_prepare_data`, `_build_model`, `_make_batches`,
`_restore`), which tinylm/finetune replaces. Functions of the trainer, as resume.py's
are; they are kept out of trainer.py so that the loop reads on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinylm import checkpoint
from tinylm.distributed import make_optimizer
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.optim import AdamW
from tinylm.precision import LossScaler, MixedPrecision
from tinylm.training.config import TrainConfig
from tinylm.training.lock import RunLock
from tinylm.training.memory import check_step_memory
from tinylm.training.resume import dropout_layers, open_checkpoint
from tinylm.training.saving import step_in


def claim(trainer, resume, overwrite: bool):
    """Check, lock and open the run directory (rank 0's part); returns the tokenizer."""
    cfg, run = trainer.config, trainer.run_dir
    if cfg.batch_size < trainer.comm.size:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {trainer.comm.size} "
                         "processes: each needs at least one row of the global batch")
    # Refusals that need nothing written or allocated come first: a step that cannot
    # fit (the vocabulary may still grow: checked again below), a directory this run
    # cannot or must not write.
    check_step_memory(cfg, known_vocab_size(cfg, resume), trainer.device)
    run.check_layout()
    if resume is None or run_dir_of(resume) != run.path.resolve():
        run.check_not_foreign()
    # The lock is held from here (the token cache is written under it) to the end of
    # train(); a run that fails to start lets it go at once.
    trainer._lock = RunLock(run.path).acquire()
    try:
        open_run(trainer, resume, overwrite)
    except BaseException:
        trainer._lock.release()
        raise
    return trainer.tokenizer


def open_run(trainer, resume, overwrite: bool, tokenizer=None) -> None:
    """The rest of __init__, under the run directory's lock (rank 0), or reading
    what rank 0 prepared (the other ranks: their ReaderRunDir writes nothing)."""
    cfg, run = trainer.config, trainer.run_dir
    run.remove_leftovers()  # of a process killed mid-write: none can be writing now
    if resume is None and not overwrite:
        run.check_unused()
    ckpt = None if resume is None else open_checkpoint(resume, cfg, trainer.device)
    trainer.resumed_from = None if ckpt is None else str(ckpt.path)

    trainer.data = trainer._prepare_data(ckpt, tokenizer)
    trainer.tokenizer = trainer.data.tokenizer
    trainer.model = trainer._build_model(ckpt)
    trainer.model.train()
    trainer.model.recompute = cfg.recompute  # activation recomputation (GPT._block_forward)
    trainer.loss_fn = SoftmaxCrossEntropy()
    # fp16/bf16: float32 master weights and AdamW, 16-bit compute (precision.py);
    # fp16 also scales the loss so that small gradients do not underflow
    trainer.precision = MixedPrecision(cfg.precision)
    trainer.scaler = LossScaler() if trainer.precision.needs_loss_scaling and cfg.loss_scaling \
        else None
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 weight_decay=cfg.weight_decay)
    if trainer.comm.size > 1 or cfg.zero:  # all-reduces the gradients; zero: shards AdamW
        trainer.optimizer = make_optimizer(trainer.model.parameters(), trainer.comm,
                                           zero=cfg.zero, **adamw)
    else:
        trainer.optimizer = AdamW(trainer.model.parameters(), **adamw)
    # Separate generators: evaluation never shifts the training batches.
    trainer.batches = trainer._make_batches()
    trainer.eval_rng = np.random.default_rng([cfg.seed, 2])
    trainer.step = 0  # optimizer steps taken
    trainer.tokens_seen = 0
    trainer.best_val_loss = None  # float once evaluated
    trainer.last_eval = None  # {"step", "train_loss", "val_loss", "val_ppl"} once evaluated
    trainer.elapsed_s = 0.0  # wall time spent in train() (evaluations included), all sessions
    trainer._clock = None  # (perf_counter at the start of this train() call, elapsed_s then)
    trainer.last_saved_step = None  # the step out_dir/last holds (an int once saved)
    if ckpt is not None:
        trainer._restore(ckpt)
        if trainer.step > cfg.max_iters:
            raise ValueError(f"{ckpt.path} is at step {trainer.step}, past max_iters "
                             f"({cfg.max_iters}): give a larger --max-iters to continue")
        trainer.last_saved_step = step_in(trainer.last_dir)
        evaluated = (trainer.last_eval or {}).get("step") == trainer.step
        run.start_log(trainer.step, evaluated=evaluated)
    else:
        run.start_log()
    if trainer.comm.rank > 0:  # other rows deserve other dropout masks than rank 0's
        rank = trainer.comm.rank
        for i, layer in enumerate(dropout_layers(trainer.model)):
            layer.rng = np.random.default_rng([cfg.seed, 3, rank, trainer.step, i])
    # The state of the last step boundary: what an interrupt saves, whenever it comes.
    trainer._snapshot = trainer.trainer_state()
    trainer._updating = False  # True while weights and AdamW state are being changed


def known_vocab_size(config: TrainConfig, resume) -> int:
    """The vocabulary size as far as it is known before the data is read: the
    checkpoint's, BPE's target, else 1 (a char vocabulary is known after reading)."""
    if isinstance(resume, checkpoint.Checkpoint):
        return resume.config.vocab_size
    if resume is not None:
        try:
            return int(checkpoint.read_meta(resume)["model"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1  # load() reports a damaged checkpoint properly, later
    return config.vocab_size if config.tokenizer == "bpe" else 1


def run_dir_of(resume) -> Path:
    """The run directory a checkpoint to resume is in (its parent)."""
    path = resume.path if isinstance(resume, checkpoint.Checkpoint) else Path(resume)
    return path.resolve().parent
