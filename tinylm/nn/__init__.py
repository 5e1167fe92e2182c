"""Layers with hand-written backward passes. See tinylm/nn/module.py for the interface."""

from tinylm.nn.activation import GELU, Dropout, ReLU, SiLU
from tinylm.nn.attention import CausalSelfAttention
from tinylm.nn.block import Block
from tinylm.nn.kv_cache import KVCache
from tinylm.nn.linear import Embedding, Linear
from tinylm.nn.loss import SoftmaxCrossEntropy
from tinylm.nn.mlp import MLP, SwiGLU
from tinylm.nn.module import Module
from tinylm.nn.moe import MoE
from tinylm.nn.norm import LayerNorm, RMSNorm
from tinylm.nn.positions import RotaryEmbedding
from tinylm.nn.preference import DPOLoss, SequenceLogProb

__all__ = [
    "Module", "Linear", "Embedding", "LayerNorm", "RMSNorm", "GELU", "ReLU", "SiLU", "Dropout",
    "RotaryEmbedding", "CausalSelfAttention", "MLP", "SwiGLU", "MoE", "Block",
    "SoftmaxCrossEntropy", "KVCache", "SequenceLogProb", "DPOLoss",
]
