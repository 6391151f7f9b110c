"""atoll's Llama and Hugging Face transformers: export a run as a transformers Llama directory, load one back.

`convert` (parameter names, the RoPE row permutation, config.json), `tokenizer_files` (tokenizer.json
and tokenizer_config.json), `export` (writing a directory from a run's checkpoint) and `load` (an HF
directory's weights into atoll's Llama; any model atoll reads, for eval and sample).

The export function is `atoll.hf.export.export`: not re-exported here, where its name would hide
the module of the same name.
"""

from atoll.checkpoint.reader import RunCheckpoint, find_checkpoint
from atoll.hf.export import ExportReport
from atoll.hf.load import LoadedModel, load_hf_weights, load_model

__all__ = [
    "ExportReport",
    "LoadedModel",
    "RunCheckpoint",
    "find_checkpoint",
    "load_hf_weights",
    "load_model",
]
