"""Text from a model: the decoding that scripts/generate.py and the trainer's --sample-interval share.

Kept beside minimal_pretrain.py because both use it: generate.py decodes a checkpoint, the trainer
prints a sample while it trains, and the two must print the same text for the same weights.

Decoding (generate): the prompt runs once at positions 0..T-1 and fills one KV cache per layer; each
new token then runs alone at its own position. A token is the argmax of the last logits (temperature
0, greedy), or drawn after temperature, top-k and top-p from a torch.Generator seeded by `seed`.
scripts/generate.py's docstring says what each option does and where generation stops.

Samples during training (TrainingSampler): every --sample-interval steps rank 0 prints the greedy
continuation of --sample-prompt, in the run's tokenizer, as nanoGPT-style trainers do. Every rank
hands rank 0 the entries it writes into a checkpoint (checkpoint.rank_payload: each slice of every
weight once over the world, whole after the distributed optimizer's all-gather); rank 0 loads them
into a one-process fp32 copy of the model on the CPU, built once, and decodes there. So the line is
what `generate.py --temperature 0` prints for the checkpoint of that step, whatever the layout. The
trained model and its optimizer are only read, and the CPU RNG state is put back: sampling changes
no loss. Shapes: T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import checkpoint as ckpt_io
import data
from moe_layers import ModelConfig, MoETransformer

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


# ===================================================== samples during training
def run_prompt(data_path: str, text: str, vocab: int, seq_length: int) -> tuple[Tokenizer, list[int]]:
    """The run's tokenizer (that of --data, which every checkpoint of the run carries) and --sample-prompt in
    it; raises ValueError naming the flag (the trainer checks this at start, before any collective)."""
    try:
        tokenizer = data.load_tokenizer(data_path)
    except data.DataError as e:  # token files whose meta.json names no tokenizer
        raise ValueError(f"--sample-interval needs the run's tokenizer to encode --sample-prompt ({e})") from None
    return tokenizer, check_prompt(tokenizer.encode(text), vocab, seq_length, "--sample-prompt")


class TrainingSampler:
    """--sample-interval: rank 0's one-process fp32 copy of the model on the CPU, refreshed from every
    rank's checkpoint entries, which prints the greedy continuation of --sample-prompt."""

    def __init__(self, mc: ModelConfig, data_path: str, prompt: str, max_new_tokens: int, rank: int,
                 world_size: int):
        self.rank, self.world_size, self.max_new_tokens = rank, world_size, max_new_tokens
        # As generate.load_model builds it: multi-token prediction modules only add a training loss.
        self.cfg = dataclasses.replace(mc, mtp_num_layers=0)
        self.tokenizer, self.prompt = run_prompt(data_path, prompt, mc.vocab_size, mc.seq_length)
        self.model: MoETransformer | None = None  # built at the first sample, on rank 0 only

    def gather(self, params: dict[str, dict]) -> dict[str, list[dict]] | None:
        """Every rank's entries {name: entry} -> rank 0's {name: [its slices]}; None on the other ranks.

        One rank at a time, so rank 0 holds at most one other rank's entries in transit (an object
        gather would allocate world size x the largest rank's pickle)."""
        if self.rank != 0:
            dist.send_object_list([params], dst=0, group=None)  # this rank's slices, pickled, over the CPU backend
            return None
        table = {name: [entry] for name, entry in params.items()}
        for src in range(1, self.world_size):
            received: list = [None]
            dist.recv_object_list(received, src=src, group=None)  # rank src's slices
            for name, entry in received[0].items():
                table.setdefault(name, []).append(entry)
        return table

    def sample(self, params: dict[str, dict], step: int) -> str | None:
        """Every rank calls this with its checkpoint entries of the weights after `step` updates; rank 0
        returns the line to print (`Step N | sample: 'text'`, the text as a Python literal: one line)."""
        table = self.gather(params)
        if table is None:
            return None
        with torch.random.fork_rng(devices=[]):  # the CPU RNG state is put back, whatever building draws
            if self.model is None:
                self.model = MoETransformer(self.cfg).eval()
            weights = ckpt_io.Checkpoint(f"the weights after step {step}", {}, table, {}, {})
            ckpt_io.load_into(weights, self.model, None)  # every slice of every layout, as a checkpoint
            new, _ = generate(self.model, self.prompt, self.max_new_tokens, temperature=0,
                              eos_id=self.tokenizer.eos_id)
        return f"Step {step} | sample: {decode_text(self.tokenizer, self.prompt, new)!r}"
