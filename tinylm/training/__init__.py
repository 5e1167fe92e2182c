"""Training a GPT, by concern (the public names are re-exported by tinylm.train):

    config.py    TrainConfig: data fields, GPTConfig's fields (declared once, in
                 tinylm/config.py), optimisation and run fields; --set parsing
    presets.py   PRESETS: nanoGPT's recipes and their Llama / MoE variants
    trainer.py   Trainer: the loop, one step, evaluation (start reading here)
    opening.py   opening a run: the checks before anything is written, the lock, and
                 building what the Trainer holds (data, model, AdamW, counters)
    saving.py    writing a checkpoint, saving on an interrupt, and the errors that stop
                 a run (full disk, TrainingDiverged) saying which checkpoint is kept
    resume.py    what trainer.json holds, and restoring it (bitwise resume)
    rundir.py    the run directory: log.jsonl, loss.png, last/ and best/; what may be written
    lock.py      one run per directory: the lock on out_dir/.lock
    signals.py   SIGINT and SIGTERM: stop at a step boundary, save, exit 130 or 143
    memory.py    what a step needs in memory: absurd settings are refused before they run
    console.py   what `tinylm train` prints (configuration, progress bar, result)
    cli.py       the `tinylm train` command: options, configuration layers, samples
"""
