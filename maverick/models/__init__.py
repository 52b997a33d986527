from .llama4 import Llama4ForCausalLM, ModelSpec

__all__ = ["Llama4ForCausalLM", "ModelSpec"]
