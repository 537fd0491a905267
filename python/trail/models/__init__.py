"""Llama-family models run by our own forward over the paged KV cache: config and presets,
the model, and loaders (HF folder, GGUF, random weights)."""
from trail.models.config import PRESETS, ModelConfig, preset
from trail.models.llama import AttentionMetadata, LlamaModel
from trail.models.loader import (default_dtype, from_state_dict, load_gguf, load_hf, load_model,
                                 load_tokenizer, random_model)

__all__ = ["PRESETS", "ModelConfig", "preset", "AttentionMetadata", "LlamaModel", "default_dtype",
           "from_state_dict", "load_gguf", "load_hf", "load_model", "load_tokenizer", "random_model"]
