"""atoll's Llama and Hugging Face transformers: load a transformers Llama directory.

`convert` (parameter names, the RoPE row permutation, config.json), `tokenizer_files` (tokenizer.json
and tokenizer_config.json) and `load` (an HF directory's weights into atoll's Llama; any model atoll
reads, for eval and sample).
"""

from atoll.checkpoint.reader import RunCheckpoint, find_checkpoint
from atoll.hf.load import LoadedModel, load_hf_weights, load_model

__all__ = [
    "LoadedModel",
    "RunCheckpoint",
    "find_checkpoint",
    "load_hf_weights",
    "load_model",
]
