"""`atoll sample`: a continuation of a prompt, to see what a model learned.

Autoregressive decoding without a KV cache (each new token reruns the context, at most the model's
max_seq_len last tokens): simple and exact, fast enough for the model sizes one samples on a CPU.
Temperature 0 is greedy (argmax), the same tokens as transformers' greedy `generate` on the export;
above 0 it samples from softmax(logits / temperature) with a seeded generator, so a seed repeats.
"""

from __future__ import annotations

import torch

from atoll.model import Llama


@torch.no_grad()
def generate(model: Llama, prompt: list[int], max_new_tokens: int, temperature: float, eos_id: int,
             vocab_size: int, seed: int = 0, device: torch.device | None = None) -> list[int]:
    """Up to `max_new_tokens` ids below `vocab_size` after `prompt`, stopping after eos (included).

    Only the tokenizer's `vocab_size` ids are candidates: a model's vocabulary may be padded past
    them (the byte tokenizer's 257 ids in a 512-row head) and those rows decode to nothing. An empty
    prompt starts from eos, i.e. at the start of a document. Raises ValueError for a negative
    temperature.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be at least 0, got {temperature}")
    device = device or torch.device("cpu")
    model.to(device).eval()
    generator = torch.Generator(device).manual_seed(seed)
    tokens = torch.tensor([prompt or [eos_id]], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.args.max_seq_len:])[0, -1, :vocab_size].float()
        if temperature == 0:
            next_id = logits.argmax()
        else:
            next_id = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[0]
        new.append(int(next_id))
        if new[-1] == eos_id:
            break
        tokens = torch.cat([tokens, next_id.view(1, 1)], dim=1)
    return new
