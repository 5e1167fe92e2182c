"""Training: the configuration, the presets, the `Trainer`, and the `tinylm train` command.

    from tinylm.train import PRESETS, Trainer
    config = PRESETS["shakespeare-char-cpu"].replace(max_iters=200, out_dir="runs/demo")
    result = Trainer(config).train()          # {"val_loss": ..., "val_ppl": ..., ...}

This module only gathers the public names; the code lives in tinylm/training/,
one file per concern (see its __init__.py). The loop is in training/trainer.py.
"""

from tinylm.config import VARIANT_FIELDS as MODEL_VARIANT_FIELDS
from tinylm.training.cli import build_config, configure, run
from tinylm.training.config import (
    MODEL_FIELDS,
    RECIPE_MODEL,
    RESUME_FIXED,
    TrainConfig,
    check_field_names,
    field_names,
    parse_field_value,
)
from tinylm.training.console import ConsoleReporter, format_config
from tinylm.training.presets import DEFAULT_PRESET, PRESET_HELP, PRESETS
from tinylm.training.rundir import RunDir, plot_log, read_log
from tinylm.training.trainer import Trainer, TrainingDiverged

__all__ = [
    "DEFAULT_PRESET", "MODEL_FIELDS", "MODEL_VARIANT_FIELDS", "PRESETS", "PRESET_HELP",
    "RECIPE_MODEL", "RESUME_FIXED", "ConsoleReporter", "RunDir", "TrainConfig", "Trainer",
    "TrainingDiverged", "build_config", "check_field_names", "configure", "field_names",
    "format_config", "parse_field_value", "plot_log", "read_log", "run",
]
