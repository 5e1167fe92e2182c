"""The `tinylm train` command: `configure(parser)` adds its options, `run(args)` trains.

The configuration is built in layers, each overriding the last: a preset, a
--config JSON file, the flags (--data, --out, ...), then --set KEY=VALUE. With
--resume the checkpoint's saved configuration takes the preset's place.

Under an MPI launcher (`mpirun -n N tinylm train ...`, detected from its environment;
--distributed insists on MPI) the N processes train data-parallel: the same global
batch, rank 0 alone printing and writing (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np

from tinylm import checkpoint, distributed
from tinylm.backend import DEVICES, to_numpy
from tinylm.sampling import check_temperature
from tinylm.training.config import (
    TrainConfig,
    check_field_names,
    parse_field_value,
    read_config_file,
)
from tinylm.training.console import ConsoleReporter, format_config, print_result
from tinylm.training.presets import DEFAULT_PRESET, PRESET_HELP, PRESETS
from tinylm.training.resume import saved_data_path
from tinylm.training.rundir import find_checkpoint
from tinylm.training.trainer import Trainer


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = textwrap.fill(
        "Train a GPT on a text file (default: the bundled Tiny Shakespeare), print the "
        "validation loss and perplexity, save checkpoints and print samples. The "
        "configuration is a preset, then a --config JSON file, then the flags below and "
        "--set, each overriding the last; it is printed in full at the start.", width=90)
    parser.epilog = _fields_help()
    g = parser.add_argument_group("configuration")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"starting configuration (default {DEFAULT_PRESET}); see below")
    g.add_argument("--config", metavar="FILE.json",
                   help='JSON object of fields to override, e.g. {"max_iters": 500} '
                        '(a "preset" key picks the preset; a preset name also works here)')
    g.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE",
                   help="override fields (repeatable), e.g. --set lr=3e-4 max_iters=500")
    g.add_argument("--data", metavar="FILE", help="UTF-8 text file to train on (field data)")
    g.add_argument("--tokenizer", metavar="char|bpe|FILE",
                   help="'char', 'bpe' (trained on the data) or a tokenizer file (field tokenizer)")
    g.add_argument("--out", metavar="DIR", help="run directory (field out_dir)")
    g.add_argument("--device", choices=DEVICES, help="cpu, cuda or auto (field device)")
    g.add_argument("--max-iters", type=int, metavar="N", help="optimizer steps (field max_iters)")
    g.add_argument("--seed", type=int, metavar="N", help="random seed (field seed)")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="compute format: fp32, or fp16/bf16 mixed precision (field precision)")
    r = parser.add_argument_group("run")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from a checkpoint: DIR is a checkpoint or a run directory "
                        "(its last/); without DIR, out_dir/last. The saved configuration is "
                        "used, with --config/--set/flags on top")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh even if out_dir already holds a run")
    r.add_argument("--dry-run", action="store_true",
                   help="print the configuration and exit without training")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI even where no launcher is detected "
                        "(`mpirun -n N tinylm train` is detected by itself)")
    s = parser.add_argument_group("samples printed at the end (from the best checkpoint)")
    s.add_argument("--samples", type=int, default=2, metavar="N",
                   help="how many (default 2; 0: none)")
    s.add_argument("--sample-tokens", type=int, default=300, metavar="N",
                   help="new tokens per sample (default 300)")
    s.add_argument("--prompt", default="\n", help="text the samples continue (default a newline)")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature, 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=200, metavar="K",
                   help="sample among the K most likely tokens (default 200; 0: all)")


def _fields_help() -> str:
    """The epilog: every field with its default and help text, the presets, examples."""
    lines = ["configuration fields (--set KEY=VALUE, or keys of a --config JSON file;",
             "defaults are the shakespeare-char-cpu preset's):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  {f.name} = {json.dumps(f.default)}")
        lines.append(textwrap.fill(f.metadata["help"], width=90, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6))
    lines.append("")
    lines.append("presets (--preset NAME):")
    for name, text in PRESET_HELP.items():
        lines.append(f"  {name:<22}{text}")
    lines += ["", "examples:",
              "  tinylm train                                   # a few minutes on a CPU",
              "  tinylm train --data my.txt --out runs/mine --set max_iters=5000",
              "  tinylm train --preset shakespeare-char --device cuda",
              "  tinylm train --resume                          # continue after Ctrl-C",
              "  mpirun -n 2 tinylm train                       # 2 processes, data-parallel"]
    return "\n".join(lines)


def build_config(args) -> tuple[TrainConfig, str, set[str], str | None]:
    """(config, where it came from, overridden field names, checkpoint to resume or None)."""
    preset, overrides = _overrides(args)
    if args.resume is None:
        name = preset or DEFAULT_PRESET
        return PRESETS[name].replace(**overrides), f"preset {name}", set(overrides), None

    # Resume: the checkpoint's own configuration, with what was given on top.
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(overrides.get("out_dir") or PRESETS[preset or DEFAULT_PRESET].out_dir)
    ckpt_dir = find_checkpoint(run_dir, ("last",))  # as `generate --checkpoint` finds it
    if ckpt_dir is None:
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir} (looked for "
                                f"{run_dir / 'last'}, and {run_dir} itself)")
    where = ckpt_dir / "trainer.json"
    state = checkpoint.read_trainer_state(ckpt_dir)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{ckpt_dir}: cannot resume: no trainer.json with a training config")
    try:
        saved = TrainConfig.from_dict(state["config"], str(where))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad saved config: {exc}") from None
    if "data" not in overrides:  # the saved path is trusted only if it is the same file
        overrides["data"] = saved_data_path(state, where)
    overrides.setdefault("out_dir", str(ckpt_dir.parent))  # the run directory it is in
    changed = {k for k, v in overrides.items() if getattr(saved, k) != v}
    return saved.replace(**overrides), f"resuming {ckpt_dir}", changed, str(ckpt_dir)


def _overrides(args) -> tuple[str | None, dict]:
    """(the preset asked for or None, the fields --config, the flags and --set give)."""
    overrides: dict = {}
    preset = args.preset
    if args.config:
        if args.config in PRESETS and not Path(args.config).exists():
            preset = preset or args.config
        else:
            file_fields = read_config_file(args.config)
            preset = preset or file_fields.pop("preset", None)
            file_fields.pop("preset", None)
            check_field_names(file_fields, args.config)
            overrides.update(file_fields)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    flags = {"data": args.data, "tokenizer": args.tokenizer, "out_dir": args.out,
             "device": args.device, "max_iters": args.max_iters, "seed": args.seed,
             "precision": args.precision}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_field_value(key.strip(), value.strip())
    return preset, overrides


def run(args) -> int:
    comm = distributed.init("mpi" if args.distributed else "auto")  # one process: no MPI
    root = comm.rank == 0
    with distributed.abort_on_failure(comm), _quiet_unless_root(comm):
        try:  # the same arguments and files on every rank: every rank fails alike
            config, source, overridden, resume = build_config(args)
            if args.samples < 0 or args.sample_tokens < 0 or args.top_k < 0:
                raise ValueError("--samples, --sample-tokens and --top-k must be >= 0")
            if args.samples:  # checked now, not after the whole run
                check_temperature(args.temperature, "--temperature")
        except Exception as exc:
            exc.agreed = True
            raise
        if root:
            print(f"tinylm train: {source} (* = overridden)")
            print(format_config(config, overridden))
            print(f"  {'world_size':<22} {comm.size}" + (
                f"  (data-parallel processes: {comm.backend}; batch_size is the global batch)"
                if comm.size > 1 else ""), flush=True)
        if args.dry_run:
            return 0
        reporter = ConsoleReporter(progress=not args.no_progress) if root else None
        try:
            trainer = Trainer(config, reporter=reporter, resume=resume,
                              overwrite=args.overwrite, comm=comm)
            result = trainer.train()
        finally:
            if reporter is not None:
                reporter.close()
    if root:
        print_result(result)
        if args.samples:
            _print_samples(trainer, args)
    return 0


@contextlib.contextmanager
def _quiet_unless_root(comm):
    """On the ranks other than 0, an error that every rank raised together (`agreed`)
    exits quietly with its code: rank 0 prints it once, not N times."""
    try:
        yield
    except BaseException as exc:
        if comm.rank == 0 or not getattr(exc, "agreed", False):
            raise
        quiet = SystemExit(getattr(exc, "exit_code", 130) if isinstance(exc, KeyboardInterrupt)
                           else 2)
        quiet.agreed = True
        raise quiet from None


def _print_samples(trainer: Trainer, args) -> None:
    from tinylm.sampling import generate

    source = trainer.best_dir if checkpoint.is_checkpoint(trainer.best_dir) else None
    model = checkpoint.load(source, device=trainer.device).model if source else trainer.model
    tok = trainer.tokenizer
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt must give at least one token")
    idx = np.asarray([ids], dtype=np.int64)  # (1, T)
    for i in range(args.samples):
        out = generate(model, idx, args.sample_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, seed=trainer.config.seed + i)
        print(f"--- sample {i + 1} ---")
        print(tok.decode([int(t) for t in to_numpy(out)[0]]))
