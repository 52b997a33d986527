"""Tensor-parallel building blocks. Global sizes in, local sizes computed with divide()."""
from .attention import Llama4Attention
from .collectives import all_gather, all_reduce, all_reduce_add_rms_norm
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .forward_batch import ForwardBatch
from .linear import Linear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from .mlp import Llama4MLP
from .moe import Llama4MoE
from .norm import RMSNorm, add_rms_norm
from .persistent_tail import layer_tail_stages, layer_tails
from .rotary import RotaryEmbedding

__all__ = ["ForwardBatch", "all_gather", "all_reduce", "all_reduce_add_rms_norm", "Linear", "Llama4Attention", "Llama4MLP", "Llama4MoE",
           "MergedColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear", "RMSNorm", "add_rms_norm",
           "RotaryEmbedding", "RowParallelLinear", "VocabParallelEmbedding", "layer_tail_stages", "layer_tails"]
