"""Layers with hand-written backward passes. See tinylm/nn/module.py for the interface."""

from tinylm.nn.activation import GELU, Dropout
from tinylm.nn.attention import CausalSelfAttention
from tinylm.nn.block import MLP, Block
from tinylm.nn.kv_cache import KVCache
from tinylm.nn.linear import Embedding, Linear
from tinylm.nn.loss import SoftmaxCrossEntropy
from tinylm.nn.module import Module
from tinylm.nn.norm import LayerNorm

__all__ = [
    "Module", "Linear", "Embedding", "LayerNorm", "GELU", "Dropout",
    "CausalSelfAttention", "MLP", "Block", "SoftmaxCrossEntropy", "KVCache",
]
