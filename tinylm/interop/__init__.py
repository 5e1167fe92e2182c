"""Interoperability: Hugging Face GPT-2 checkpoints in and out, via safetensors.

    from tinylm.interop import from_hf_gpt2, load_hf_gpt2, to_hf_gpt2
    model = from_hf_gpt2("path/to/gpt2")             # config.json + model.safetensors
    model, tokenizer = load_hf_gpt2("path/to/gpt2")  # + vocab.json/merges.txt when present
    to_hf_gpt2(model, "out/")                        # loads in transformers' GPT2LMHeadModel

Where to look:
  safetensors.py   the file format, read (memory-mapped) and written with NumPy only
  gpt2.py          GPT-2's config keys and tensor names <-> tinylm's GPTConfig and state_dict
The name table, what is checked and how to run a real GPT-2 are in docs/interop.md.
"""

from .gpt2 import (
    HFCheckpointError,
    config_from_hf,
    config_to_hf,
    from_hf_gpt2,
    load_hf_gpt2,
    to_hf_gpt2,
)
from .safetensors import SafetensorsError, load_file, read_header, save_file

__all__ = [
    "HFCheckpointError",
    "SafetensorsError",
    "config_from_hf",
    "config_to_hf",
    "from_hf_gpt2",
    "load_file",
    "load_hf_gpt2",
    "read_header",
    "save_file",
    "to_hf_gpt2",
]
