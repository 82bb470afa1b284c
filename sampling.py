"""Text from a model: the decoding that scripts/generate.py and the trainer's --sample-interval share.

Kept beside minimal_pretrain.py because both use it: generate.py decodes a checkpoint, the trainer
prints a sample while it trains, and the two must print the same text for the same weights.

Decoding (generate): the prompt runs once at positions 0..T-1 and fills one KV cache per layer; each
new token then runs alone at its own position. A token is the argmax of the last logits (temperature
0, greedy), or drawn after temperature, top-k and top-p from a torch.Generator seeded by `seed`.
scripts/generate.py's docstring says what each option does and where generation stops.

Shapes: T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import torch

import data
from moe_layers import MoETransformer

Tokenizer = data.ByteTokenizer | data.TextTokenizer


# ================================================================== decoding
def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(V,) logits -> (V,) probabilities to draw from, after temperature, top-k and top-p (temperature > 0).

    Any temperature > 0 and top-p > 0 give a distribution: the logits are shifted so the largest is 0
    before dividing (a tiny temperature sends the others to -inf, not inf - inf = nan: greedy in
    effect, ties shared), and top-p keeps the most likely token whatever the mass (a top-p below
    float32's smallest number rounds to 0 in the comparison)."""
    logits = logits.float()
    logits = (logits - logits.max()) / temperature  # <= 0 everywhere, the top token(s) exactly 0
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)  # (V,), (V,)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability of the more likely tokens
        drop = before >= top_p  # already reached top-p without them
        drop[0] = False  # the most likely token is always kept
        probs = probs.index_fill(0, order[drop], 0.0)
        probs = probs / probs.sum()
    return probs


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, temperature, top_k, top_p).cpu(), 1, generator=gen))


@torch.no_grad()
def generate(model: MoETransformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
             eos_id: int | None = None) -> tuple[list[int], bool]:
    """Return (new tokens, whether the cache stopped generation at seq_length); the new tokens end
    with eos_id when the model drew it (generation stops there)."""
    seq_length = model.cfg.seq_length
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    new: list[int] = []
    if use_cache:
        caches = [{} for _ in model.layers]  # per layer: "k", "v" (B, Hkv, T_seen, Dh), filled by Attention
        x = torch.tensor([ids], device=device)  # (1, T)
        logits = model(x, positions=torch.arange(len(ids), device=device), kv_caches=caches).output[0, -1]
        while len(new) < max_new_tokens:
            new.append(next_token(logits, temperature, top_k, top_p, gen))
            pos = len(ids) + len(new) - 1  # the position the new token is fed at
            if len(new) == max_new_tokens or new[-1] == eos_id:
                break
            if pos >= seq_length:
                return new, True
            x = torch.tensor([[new[-1]]], device=device)  # (1, 1)
            logits = model(x, positions=torch.tensor([pos], device=device), kv_caches=caches).output[0, -1]
        return new, False
    for _ in range(max_new_tokens):
        window = (ids + new)[-seq_length:]
        logits = model(torch.tensor([window], device=device)).output[0, -1]  # (V,)
        new.append(next_token(logits, temperature, top_k, top_p, gen))
        if new[-1] == eos_id:
            break
    return new, False


def decode_text(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The prompt and its continuation as text; an end-of-document id that stopped generation is not printed."""
    return tokenizer.decode(prompt + (new[:-1] if new and new[-1] == tokenizer.eos_id else new))


def check_prompt(prompt: list[int], vocab: int, seq_length: int, flag: str) -> list[int]:
    """The prompt's ids; raises ValueError naming `flag` when they cannot start a generation."""
    if not prompt:
        raise ValueError(f"{flag}: the prompt is empty; give at least one token")
    if not all(0 <= i < vocab for i in prompt):
        raise ValueError(f"{flag}: token ids must lie in [0, {vocab}), the model's vocabulary")
    if len(prompt) > seq_length:
        raise ValueError(f"{flag}: the prompt has {len(prompt)} tokens, more than the model's seq_length "
                         f"{seq_length}; shorten it")
    return prompt
