"""Interoperability: Hugging Face GPT-2 and Llama checkpoints in and out, via safetensors.

    from tinylm.interop import from_hf_gpt2, load_hf_gpt2, to_hf_gpt2
    model = from_hf_gpt2("path/to/gpt2")             # config.json + model.safetensors
    model, tokenizer = load_hf_gpt2("path/to/gpt2")  # + vocab.json/merges.txt when present
    to_hf_gpt2(model, "out/")                        # loads in transformers' GPT2LMHeadModel

    from tinylm.interop import from_hf_llama, to_hf_llama
    model = from_hf_llama("path/to/llama")           # Llama or Mistral: config.json + weights
    to_hf_llama(model, "out/")                       # loads in transformers' LlamaForCausalLM

Where to look:
  safetensors.py   the file format, read (memory-mapped) and written with NumPy only
  hf.py            a Hugging Face directory: config.json, weights (or shards), the checks
  gpt2.py          GPT-2's config keys and tensor names <-> tinylm's GPTConfig and state_dict
  llama.py         the same for Llama and Mistral (RoPE, RMSNorm, SwiGLU, grouped-query attention)
The name tables, what is checked and how to run a real GPT-2 are in docs/interop.md.
"""

from .gpt2 import config_from_hf, config_to_hf, from_hf_gpt2, load_hf_gpt2, to_hf_gpt2
from .hf import HFCheckpointError
from .llama import config_from_hf_llama, config_to_hf_llama, from_hf_llama, to_hf_llama
from .safetensors import SafetensorsError, load_file, read_header, save_file

__all__ = [
    "HFCheckpointError",
    "SafetensorsError",
    "config_from_hf",
    "config_from_hf_llama",
    "config_to_hf",
    "config_to_hf_llama",
    "from_hf_gpt2",
    "from_hf_llama",
    "load_file",
    "load_hf_gpt2",
    "read_header",
    "save_file",
    "to_hf_gpt2",
    "to_hf_llama",
]
