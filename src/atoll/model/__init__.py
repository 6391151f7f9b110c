"""The Llama-3 model, its named sizes and its training loss."""

from atoll.model.llama import Llama, ModelArgs, apply_activation_checkpointing
from atoll.model.loss import chunked_lm_loss, lm_loss
from atoll.model.sizes import SIZES, count_params, get_size

__all__ = ["ModelArgs", "Llama", "SIZES", "get_size", "count_params", "lm_loss", "chunked_lm_loss",
           "apply_activation_checkpointing"]
