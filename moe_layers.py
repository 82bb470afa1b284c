"""A sparse Mixture-of-Experts decoder, readable top to bottom, leaf to root.

config -> norm -> rotary attention -> dense MLP -> router -> experts -> MoE layer -> block
-> transformer. The tensor-, sequence- and expert-parallel building blocks the layers use
(collectives as autograd functions, parallel linear layers) are in parallel_layers.py.

The weights mean what transformers' Qwen3MoeForCausalLM means by them (Qwen3ForCausalLM
when num_experts == 0), so an exported model gives the same logits there.

Shape legend
    B batch (micro-batch) size      T sequence length      D hidden size
    N = B*T tokens                  n tokens this rank routes (N / TP)
    T/TP the sequence slice of a TP rank between layers under sequence parallelism
    H query heads (on this rank)    Hkv key/value heads    Dh head dim
    E experts                       E_local experts on this rank      K top-k
    F expert hidden size            V vocab (V_local on this rank)
    A = n*K routed assignments      M rows an EP rank receives

Parallelism is optional: every module also runs in one process with no process group.
TP splits q/k/v and gate/up by columns, o and down by rows, and the vocabulary; SP keeps the
residual stream split by sequence between them; EP spreads the experts of a layer over ranks,
tokens travelling to them by all-to-all (see parallel_layers.py).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from parallel_layers import (ColumnParallelLinear, ModelParallel, RowParallelLinear, VocabParallelEmbedding,
                             all_to_all, column_parallel, compute_dtype, gather_tokens, gather_tp_rows, place,
                             placement, split_tokens)


# --------------------------------------------------------------------------- config
def arg(default: Any, help: str, **kw: Any) -> Any:
    """A config field that also carries its command-line help (and choices) as metadata."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Every model hyper-parameter. Each field is a flag of minimal_pretrain.py (`num_experts` ->
    `--num-experts`) whose help text (and choices) it carries as metadata: the one description
    that --help and README_MOE.md's flag tables show."""

    vocab_size: int = arg(256, "vocabulary size (byte-level data: 256; token files: from meta.json)")
    hidden_size: int = arg(128, "model width D")
    num_layers: int = arg(4, "decoder blocks")
    num_attention_heads: int = arg(4, "query heads")
    num_kv_heads: int = arg(2, "key/value heads (grouped-query attention when fewer than query heads)")
    head_dim: int = arg(0, "width of each attention head; q/k/v/o are heads x head-dim wide, which need not be the "
                           "hidden size (Qwen3-30B-A3B: hidden 2048, 32 heads of 128); 0 = hidden size / heads")
    ffn_hidden_size: int = arg(512, "hidden width of the dense SwiGLU MLP layers")
    moe_ffn_hidden_size: int = arg(256, "hidden width of each expert")
    num_experts: int = arg(8, "experts per MoE layer; 0 gives a dense model")
    num_experts_per_token: int = arg(2, "top-k: experts each token is sent to")
    moe_layer_interval: int = arg(1, "layer i is an MoE layer iff (i + 1) % interval == 0 (and i >= "
                                     "--first-k-dense-layers)")
    first_k_dense_layers: int = arg(0, "the first this many layers are dense whatever the interval (DeepSeek-V3: 3, "
                                       "Kimi-K2: 1)")
    moe_layer_list: str = arg("", "comma-separated 0-based MoE layers, e.g. 1,3,5 (instead of the interval and "
                                  "first-k); empty: the interval decides")
    norm_topk_prob: bool = arg(True, "renormalise the top-k router weights to sum to 1")
    num_shared_experts: int = arg(0, "always-on shared experts per MoE layer (DeepSeekMoE)")
    shared_expert_ffn_hidden_size: int = arg(0, "width of each shared expert; 0 = --moe-ffn-hidden-size")
    router_score_function: str = arg("softmax", "softmax | sigmoid (sigmoid: top-k weights renormalised, as "
                                                "DeepSeek-V3)", choices=["softmax", "sigmoid"])
    router_topk_scaling_factor: float = arg(1.0, "multiply the top-k combine weights (after renormalisation) by "
                                                 "this (DeepSeek-V3: 2.5, Kimi-K2: 2.827)")
    router_num_groups: int = arg(1, "group-limited routing: split the experts into this many contiguous "
                                    "groups; 1 = off")
    router_group_topk: int = arg(1, "groups each token keeps (a group scored by the sum of its two best expert "
                                    "scores) before choosing its top-k among their experts")
    router_type: str = arg("topk", "topk | expert-choice (each expert takes its best tokens; not causal) | "
                                   "round-robin (forced balance, for benchmarks)",
                           choices=["topk", "expert-choice", "round-robin"])
    router_aux_loss_type: str = arg("micro-batch", "micro-batch | global-batch | sequence: where the balancing loss "
                                                   "counts f_i", choices=["micro-batch", "global-batch", "sequence"])
    moe_capacity_factor: float = arg(0.0, "expert capacity = factor x tokens x top-k / experts; lowest-scored "
                                          "assignments beyond it are dropped; 0 = dropless")
    router_jitter_noise: float = arg(0.0, "multiply router inputs by U(1-eps, 1+eps) in training (Switch); 0 = off")
    seq_length: int = arg(256, "tokens per training sequence")
    rope_theta: float = arg(10000.0, "rotary embedding base")
    rms_norm_eps: float = arg(1e-6, "RMSNorm epsilon")
    init_std: float = arg(0.02, "std of the normal initialisation")
    mtp_num_layers: int = arg(0, "multi-token prediction modules (DeepSeek-V3 MTP): module k predicts the token k + "
                                 "1 ahead through its own block and the shared embedding and LM head; training "
                                 "only, generation and export ignore them; 0 = off")

    @property
    def attn_head_dim(self) -> int:
        """Dh: --head-dim, or hidden / heads when it is 0. Attention is H*Dh wide, which need not be D
        (Qwen3-30B-A3B: D 2048, 32 heads of 128)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def moe_layer_ids(self) -> list[int]:
        """The layers --moe-layer-list names (validate has checked they are distinct ints in range)."""
        return [int(i) for i in self.moe_layer_list.split(",")] if self.moe_layer_list else []

    def is_moe_layer(self, i: int) -> bool:
        """The one rule of which layers are MoE; everything else (stages, stats, planner, flops, export) asks it."""
        if self.num_experts == 0:
            return False
        if self.moe_layer_list:
            return i in self.moe_layer_ids
        return i >= self.first_k_dense_layers and (i + 1) % self.moe_layer_interval == 0

    @property
    def shared_ffn_hidden_size(self) -> int:
        """Width of the one SwiGLU that holds all shared experts side by side."""
        return self.num_shared_experts * (self.shared_expert_ffn_hidden_size or self.moe_ffn_hidden_size)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def leading_dense_layers(self) -> int | None:
        """k when the layers are "the first k dense, then every layer MoE" (the one pattern transformers'
        Glm4Moe and llama.cpp's glm4moe express); None for any other placement of the MoE layers."""
        k = self.num_layers - len(self.moe_layers)
        return k if self.moe_layers == list(range(k, self.num_layers)) else None

    @property
    def routing_weight_on_hidden(self) -> bool:
        """Where the experts apply each row's routing weight: y = w down(h) = down(w h), so on the narrower
        of h (F wide, when F < D: fine-grained MoE, e.g. 64 experts of 176 at D 1024) and the output y (D)."""
        return self.moe_ffn_hidden_size < self.hidden_size

    @property
    def mtp_layers(self) -> list[int]:
        """Layer indices of the MTP modules' blocks: module k (1..D) holds layer num_layers + k - 1."""
        return list(range(self.num_layers, self.num_layers + self.mtp_num_layers))

    @property
    def all_moe_layers(self) -> list[int]:
        """Every MoE layer: the main stack's, then the MTP blocks (MoE when the model is, as in DeepSeek-V3)."""
        return self.moe_layers + (self.mtp_layers if self.num_experts > 0 else [])

    def block_active_params(self, i: int) -> int:
        """Parameters a token multiplies by in block i: attention with its norms, and the dense MLP
        or the router, K of E experts and the shared experts."""
        d, dh = self.hidden_size, self.attn_head_dim
        attn = d * dh * (2 * self.num_attention_heads + 2 * self.num_kv_heads) + 2 * dh + 2 * d
        if i in self.all_moe_layers:
            return (attn + d * self.num_experts + self.num_experts_per_token * 3 * d * self.moe_ffn_hidden_size
                    + 3 * d * self.shared_ffn_hidden_size)
        return attn + 3 * d * self.ffn_hidden_size

    def active_params_per_token(self) -> int:
        """Parameters one token's forward pass multiplies by, without the input embedding
        (a lookup) and the MTP modules (training only): blocks, final norm, LM head."""
        d = self.hidden_size
        return self.vocab_size * d + d + sum(self.block_active_params(i) for i in range(self.num_layers))

    def mtp_active_params_per_token(self) -> int:
        """What the MTP modules add in training: per module two norms and the 2D -> D projection,
        its block, its final norm and the shared LM head once more."""
        d = self.hidden_size
        return sum(2 * d + 2 * d * d + self.block_active_params(i) + d + self.vocab_size * d for i in self.mtp_layers)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x active parameters (MTP modules included) + 12 x blocks x H x Dh
        x T for the attention scores and values (PaLM, Chowdhery et al. 2022, appendix B). Basis of MFU."""
        blocks = self.num_layers + self.mtp_num_layers
        return (6 * (self.active_params_per_token() + self.mtp_active_params_per_token())
                + 12 * blocks * self.num_attention_heads * self.attn_head_dim * self.seq_length)

    def validate(self) -> None:
        """Raise ValueError naming the flag to change."""
        c = self
        positive = ["vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                    "ffn_hidden_size", "moe_ffn_hidden_size", "moe_layer_interval", "seq_length"]
        for name in positive:
            if getattr(c, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
        if c.head_dim < 0:
            raise ValueError(f"--head-dim must be >= 0 (0: hidden / heads), got {c.head_dim}")
        if not c.head_dim and c.hidden_size % c.num_attention_heads:
            raise ValueError(f"--num-attention-heads ({c.num_attention_heads}) must divide "
                             f"--hidden-size ({c.hidden_size}), or give --head-dim")
        if c.attn_head_dim % 2:
            raise ValueError(f"--head-dim {c.attn_head_dim} (0: hidden / heads) must be even for rotary embeddings")
        if c.num_attention_heads % c.num_kv_heads:
            raise ValueError(f"--num-kv-heads ({c.num_kv_heads}) must divide "
                             f"--num-attention-heads ({c.num_attention_heads})")
        if c.num_experts < 0:
            raise ValueError(f"--num-experts must be >= 0, got {c.num_experts}")
        if c.num_experts > 0 and not 1 <= c.num_experts_per_token <= c.num_experts:
            raise ValueError(f"--num-experts-per-token ({c.num_experts_per_token}) must be between 1 and "
                             f"--num-experts ({c.num_experts})")
        choices = {"router_score_function": ("softmax", "sigmoid"),
                   "router_type": ("topk", "expert-choice", "round-robin"),
                   "router_aux_loss_type": ("micro-batch", "global-batch", "sequence")}
        for name, allowed in choices.items():
            if getattr(c, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(c, name)!r}")
        for name in ("num_shared_experts", "shared_expert_ffn_hidden_size", "moe_capacity_factor",
                     "router_jitter_noise"):
            if not getattr(c, name) >= 0 or not math.isfinite(getattr(c, name)):  # `not >=` also catches NaN
                raise ValueError(f"--{name.replace('_', '-')} must be finite and >= 0, got {getattr(c, name)}")
        # Zero or negative values here train NaN or an all-zero model "successfully".
        for name in ("rms_norm_eps", "init_std"):
            if not getattr(c, name) > 0 or not math.isfinite(getattr(c, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be finite and > 0, got {getattr(c, name)}")
        if not 1 < c.rope_theta < math.inf:
            raise ValueError(f"--rope-theta must be finite and > 1 (rotary frequencies theta^(-2i/d)), "
                             f"got {c.rope_theta}")
        if c.router_jitter_noise >= 1:
            raise ValueError(f"--router-jitter-noise must be < 1 (inputs scaled by U(1-eps, 1+eps)), "
                             f"got {c.router_jitter_noise}")
        if c.mtp_num_layers < 0:
            raise ValueError(f"--mtp-num-layers must be >= 0, got {c.mtp_num_layers}")
        if c.mtp_num_layers >= c.seq_length:  # module k predicts k + 1 ahead: some position must have a target
            raise ValueError(f"--mtp-num-layers ({c.mtp_num_layers}) must be below --seq-length ({c.seq_length})")
        c.validate_layer_pattern()
        c.validate_group_routing()
        if c.router_type == "expert-choice" and c.router_aux_loss_type != "micro-batch":
            raise ValueError("--router-type expert-choice is balanced by construction; it takes no "
                             "--router-aux-loss-type")

    def validate_layer_pattern(self) -> None:
        """--first-k-dense-layers and --moe-layer-list: in range, and the list not mixed with the others."""
        c = self
        if c.first_k_dense_layers < 0:
            raise ValueError(f"--first-k-dense-layers must be >= 0, got {c.first_k_dense_layers}")
        if c.num_experts > 0 and c.first_k_dense_layers >= c.num_layers:
            raise ValueError(f"--first-k-dense-layers {c.first_k_dense_layers} leaves no MoE layer of the "
                             f"{c.num_layers}; use fewer, or --num-experts 0 for a dense model")
        if not c.moe_layer_list:
            return
        if c.num_experts == 0:
            raise ValueError("--moe-layer-list names MoE layers; it needs --num-experts > 0")
        if c.first_k_dense_layers or c.moe_layer_interval != 1:
            raise ValueError("--moe-layer-list names every MoE layer itself; drop --first-k-dense-layers and "
                             "--moe-layer-interval")
        items = c.moe_layer_list.split(",")
        if not all(item.strip().isdigit() for item in items):
            raise ValueError(f"--moe-layer-list must be comma-separated layer numbers like 1,3,5, "
                             f"got {c.moe_layer_list!r}")
        layers = [int(item) for item in items]
        if len(set(layers)) != len(layers) or max(layers) >= c.num_layers:
            raise ValueError(f"--moe-layer-list {c.moe_layer_list} must name distinct layers between 0 and "
                             f"--num-layers - 1 = {c.num_layers - 1}")

    def validate_group_routing(self) -> None:
        """--router-topk-scaling-factor, --router-num-groups and --router-group-topk."""
        c = self
        if not 0 < c.router_topk_scaling_factor < math.inf:  # also false for NaN
            raise ValueError(f"--router-topk-scaling-factor must be finite and > 0, got {c.router_topk_scaling_factor}")
        if c.router_num_groups < 1:
            raise ValueError(f"--router-num-groups must be >= 1, got {c.router_num_groups}")
        if not 1 <= c.router_group_topk <= c.router_num_groups:
            raise ValueError(f"--router-group-topk ({c.router_group_topk}) must be between 1 and "
                             f"--router-num-groups ({c.router_num_groups})")
        grouped = c.router_num_groups > 1
        if c.router_type != "topk" and (grouped or c.router_topk_scaling_factor != 1):
            raise ValueError(f"--router-num-groups and --router-topk-scaling-factor shape top-k routing; "
                             f"--router-type {c.router_type} takes neither")
        if not grouped or c.num_experts == 0:
            return
        if c.num_experts % c.router_num_groups:
            raise ValueError(f"--router-num-groups ({c.router_num_groups}) must divide --num-experts "
                             f"({c.num_experts})")
        per_group = c.num_experts // c.router_num_groups
        if per_group < 2:
            raise ValueError(f"--router-num-groups {c.router_num_groups} leaves {per_group} expert per group; a "
                             f"group is scored by its two best experts, so use at most {c.num_experts // 2} groups")
        if c.num_experts_per_token > c.router_group_topk * per_group:
            raise ValueError(f"--num-experts-per-token ({c.num_experts_per_token}) must not exceed the experts of "
                             f"the kept groups, --router-group-topk x experts per group = "
                             f"{c.router_group_topk} x {per_group}")


def draw_normal(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """The full tensor of weight `name`: normal(0, std) from a generator seeded by (seed, name)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**64)  # any seed >= 0
    return torch.randn(shape, generator=gen) * std


def layout_free_init_(model: nn.Module, seed: int) -> None:
    """Initialise every parameter so that the full model depends on `seed` only.

    Each parameter draws its *full* tensor from a generator seeded by (seed, its name) and
    keeps its own slice, so one process and any TP / EP / PP layout hold the same model. Weights
    stored side by side (an expert's gate and up) draw each part by the part's own name."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            with torch.no_grad():
                p.fill_(1.0)
            continue
        where = placement(p)
        full = torch.cat([draw_normal(seed, name.rsplit(".", 1)[0] + "." + part if part else name,
                                      where.part_shape, where.init_std) for part in where.parts or ("",)], dim=-1)
        if where.shard:
            full = full.chunk(where.size, dim=where.dim)[where.rank]
        with torch.no_grad():
            p.copy_(full)



# ------------------------------------------------------------------------- norm, rope
class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 (as transformers' Qwen3RMSNorm).

    Precision is decided here: with weights of the input's dtype (fp32, or bf16 weights with fp32 masters) the
    output has that dtype (bf16 activations stay bf16, as in Megatron-Core and torchtitan), whatever autocast
    says. CUDA autocast lists rms_norm among its fp32 ops, so under it the input would be upcast and every norm
    output would be fp32 (and be cast back to bf16 by each projection that reads it); autocast is off inside the
    norm instead, and F.rms_norm still sums the squares in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype == self.weight.dtype:  # one fused kernel, weight included, on CUDA
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            # fp32 weight, lower-precision input (q/k norms under --dtype bfloat16-autocast, the
            # fp32-weight scheme): normalise in fp32, round to x's dtype, then scale by the fp32
            # weight (so the result is fp32), exactly as Qwen3RMSNorm does
            return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos / sin tables of rotary position embeddings (RoFormer, Su et al. 2021), pairing dims i and i + Dh/2 of
    each head (NeoX / Llama / Qwen3): x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]. `apply_rotary`
    writes it as x cos + roll(x, Dh/2) sin' with sin' = [-sin1, sin2] stored here: the same products bit for bit
    (negation is exact), four element-wise kernels instead of five. Three (addcmul) were tried: the fused
    multiply-add rounds differently with the tensor's size, so TP layouts stopped reproducing one process's
    weights to the parity tests' tolerance."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, Dh/2)
        self.register_buffer("cos", torch.cat((freqs, freqs), dim=-1).cos(), persistent=False)  # (T, Dh)
        self.register_buffer("sin", torch.cat((-freqs.sin(), freqs.sin()), dim=-1), persistent=False)  # (T, Dh) sin'

    def forward(self, positions: torch.Tensor | slice,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin') (T, Dh) of positions (T,) or a slice (training's 0..T-1: views), once per forward."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """Rotate q (B, H, T, Dh) and k (B, Hkv, T, Dh) by the (cos, sin') tables of their positions."""
    cos, sin = (t.to(q.dtype) for t in rope)  # no copy when the tables are in q's dtype already
    half = q.shape[-1] // 2
    return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin  # roll: [x2, x1]


# ------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Causal grouped-query attention with per-head RMSNorm on q and k (Qwen3) and rotary."""

    def __init__(self, cfg: ModelConfig, par: ModelParallel):
        super().__init__()
        self.par = par
        dh, d = cfg.attn_head_dim, cfg.hidden_size
        self.n_heads = cfg.num_attention_heads // par.tp_size  # H on this rank
        self.n_kv = cfg.num_kv_heads // par.tp_size
        self.head_dim = dh
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # residual branches start small (GPT-2)
        self.q_proj = ColumnParallelLinear(d, cfg.num_attention_heads * dh, par, cfg.init_std)
        self.k_proj = ColumnParallelLinear(d, cfg.num_kv_heads * dh, par, cfg.init_std)
        self.v_proj = ColumnParallelLinear(d, cfg.num_kv_heads * dh, par, cfg.init_std)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * dh, d, par, out_std)
        self.q_norm = RMSNorm(dh, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(dh, cfg.rms_norm_eps)
        # Each TP rank normalises only its own heads, so these weights get partial gradients.
        place(self.q_norm.weight, tp_partial_grad=True)
        place(self.k_norm.weight, tp_partial_grad=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: dict | None = None) -> torch.Tensor:
        """x (B, T, D), or this rank's slice (B, T/TP, D) under SP; rope: (cos, sin) of the T positions."""
        # SP: rotary positions and the causal mask need the whole sequence, so attention runs on it
        q, k, v = column_parallel(x, self.par, self.q_proj, self.k_proj, self.v_proj)  # (B, T, (H | Hkv) * Dh)
        b, t, _ = q.shape
        q = self.q_norm(q.view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_norm(k.view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rotary(q, k, rope)
        if kv_cache is not None:  # generation: prepend the keys and values of earlier positions
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        # enable_gqa: query head h reads kv head h // (H / Hkv) inside the kernel, with no
        # repeat_interleave copies of k and v (nor their summed gradients)
        gqa = self.n_heads != self.n_kv
        # With a cache, T queries sit at the end of T_kv keys: causal mask aligned bottom-right.
        causal = kv_cache is None or t > 1
        if kv_cache is not None and t > 1 and k.shape[2] != t:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*Dh)
        return self.o_proj(y)  # (B, T, D); SP: (B, T/TP, D)


# ------------------------------------------------------------------------- dense MLP
class DenseMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig, par: ModelParallel, width: int | None = None):
        super().__init__()
        self.par = par
        width = width or cfg.ffn_hidden_size
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, width, par, cfg.init_std)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, width, par, cfg.init_std)
        self.down_proj = RowParallelLinear(width, cfg.hidden_size, par, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = column_parallel(x, self.par, self.gate_proj, self.up_proj)  # (B, T, F / TP) each
        return self.down_proj(F.silu(gate) * up)  # (B, T, D); SP: (B, T/TP, D)


# ---------------------------------------------------------------------------- router
@dataclass
class RouterOutput:
    weights: torch.Tensor  # (n, K) fp32 combine weights of the chosen experts
    indices: torch.Tensor  # (n, K) chosen expert ids, best first
    probs: torch.Tensor  # (n, E) fp32 router distribution over experts (sums to 1 per token)
    logits: torch.Tensor  # (n, E) fp32 router logits
    scores: torch.Tensor  # (n, E) fp32 per-expert scores: softmax probs or sigmoid gates


class Router(nn.Module):
    """The router: linear scores hidden -> E in fp32, softmax or sigmoid, optional group-limited choice, top-k
    (Shazeer et al. 2017; Switch, Fedus et al. 2021). Expert choice and round-robin use its scores too:
    SparseMoELayer.assign turns them into rows.

    Contract: for x (n, D) returns, per token, the K experts with the largest scores and their weights. Scores
    are softmax probabilities (Mixtral, Qwen3-MoE; the K weights renormalised when `norm_topk_prob`) or sigmoid
    gates (DeepSeek-V3; the K weights always renormalised). `expert_bias` (E,) is added to the scores for the
    *choice* only, never to the weights: the aux-loss-free balancing of DeepSeek-V3 (Wang et al. 2024) moves it
    between steps; it stays zero otherwise. Group-limited routing (DeepSeek-V3, `router_num_groups` G > 1): the
    E experts form G contiguous groups of E / G, each group is scored by the sum of its two best biased scores,
    and the K experts are chosen among the `router_group_topk` best groups only (which bounds how many EP ranks,
    or nodes, a token travels to). The K weights, after any renormalisation, are multiplied by
    `router_topk_scaling_factor` (DeepSeek-V3 2.5, Kimi-K2 2.827), exactly as transformers' DeepseekV3TopkRouter
    and Glm4MoeTopkRouter do. The math runs in fp32 even under bf16 autocast: small score differences decide the
    choice, and the z-loss needs an accurate logsumexp. Under TP each rank routes only its 1/TP slice of the
    tokens, so the weight's gradient is a partial sum over TP ranks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_token
        self.sigmoid = cfg.router_score_function == "sigmoid"
        self.normalize = cfg.norm_topk_prob or self.sigmoid
        self.scaling_factor = cfg.router_topk_scaling_factor
        self.num_groups, self.group_topk = cfg.router_num_groups, cfg.router_group_topk
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        place(self.weight, init_std=cfg.init_std, tp_partial_grad=True)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))  # saved in checkpoints

    def forward(self, x: torch.Tensor) -> RouterOutput:
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (n, E)
            if self.sigmoid:
                scores = logits.sigmoid()  # (n, E)
                probs = scores / scores.sum(dim=-1, keepdim=True)  # (n, E), for the balancing loss
            else:
                scores = probs = logits.softmax(dim=-1)  # (n, E)
            choice = scores + self.expert_bias  # (n, E)
            if self.num_groups > 1:
                choice = self.keep_best_groups(choice)
            _, indices = choice.topk(self.top_k, dim=-1)  # (n, K)
            weights = scores.gather(1, indices)  # (n, K)
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.scaling_factor != 1.0:  # one kernel (and its backward) fewer at the default
                weights = weights * self.scaling_factor
        return RouterOutput(weights, indices, probs, logits, scores)

    def keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (n, E) with the experts outside each token's `group_topk` best groups set to -inf."""
        n, e = choice.shape
        grouped = choice.view(n, self.num_groups, e // self.num_groups)  # (n, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (n, G) sum of each group's two best
        kept = group_scores.topk(self.group_topk, dim=-1).indices  # (n, group_topk)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # (n, G)
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(n, e)  # (n, E)


def count_per_expert(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) how many of the given expert ids name each expert.

    scatter_add, not bincount: bincount reads the max id back to the host (a CUDA sync)."""
    flat = expert.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                        counts: torch.Tensor | None = None, num_tokens: int | None = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4).

    f_i: fraction of the routed assignments that went to expert i (no gradient). P_i: mean router probability of
    expert i over the tokens (carries the gradient). Uniform routing gives exactly 1.0; total collapse onto one
    expert gives E. When a micro-batch's tokens are split over ranks, pass `counts` (E,) summed over those ranks
    and their total `num_tokens`: the result is then this rank's share of the loss, and the shares of all ranks
    add up to the loss of the whole micro-batch. `counts` may also come from a larger batch (global-batch
    balancing): f is then that batch's frequency."""
    if counts is None:
        counts = count_per_expert(indices, num_experts)
    if num_tokens is None:
        num_tokens = probs.shape[0]
    f = counts / counts.sum()  # (E,) fraction of the assignments counted (true division: float)
    return torch.dot(f, probs.sum(dim=0)) * (num_experts / num_tokens)  # E sum_i f_i P_i, P_i = sum_t p_ti / N


def router_z_loss(logits: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """ST-MoE router z-loss mean_tokens(logsumexp(logits)^2) (Zoph et al. 2022, eq. 5).

    Keeps router logits small so the softmax stays accurate in low precision. With
    `num_tokens` (the micro-batch total when tokens are split over ranks) it returns this
    rank's share of the mean."""
    if num_tokens is None:
        num_tokens = logits.shape[0]
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    return torch.dot(lse, lse) / num_tokens  # sum of squares in one kernel


# --------------------------------------------------------------------------- experts
class _ContiguousGrad(torch.autograd.Function):
    """Identity that makes the incoming gradient contiguous (torch._grouped_mm needs 16-byte strides)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g.contiguous()


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of one (M, 2F) tensor holding [gate | up] side by side -> (M, F).

    By hand so that the backward writes the gradient of both halves into one (M, 2F) tensor, the layout the
    fused gate-up GEMM's backward wants: autograd of two slices would build two zero-padded (M, 2F) gradients
    and add them. silu(gate) is recomputed in backward rather than kept (one (M, F) tensor less per layer and
    micro-batch in flight)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # (M, F) views
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # Inductor writes both halves in one kernel; out= views break graphs
            return torch.cat([torch.ops.aten.silu_backward(grad_h * up, gate), grad_h * F.silu(gate)], dim=-1)
        grad = torch.empty_like(gate_up)  # (M, 2F): [d/d gate | d/d up]
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_h, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_h * up, gate, grad_input=grad_gate)  # silu'(gate) grad_h up
        return grad


class Experts(nn.Module):
    """The E_local SwiGLU experts of one MoE layer on this rank, as stacked weights.

    w_gate_up (E_local, D, 2F) holds expert e's gate and up projections side by side at index e, [w_gate |
    w_up], so that one GEMM computes both; w_down (E_local, F, D). x @ w multiplies without transposes.
    Checkpoints keep w_gate and w_up apart (Placement.parts: checkpoint.py splits and joins them), as they have
    always been saved. Experts run on rows grouped by expert: one grouped GEMM per projection
    (torch._grouped_mm, CUDA) or a loop over experts (`ExpertLoop`; the faster of the two on the CPU). Each
    row's output is scaled by its routing weight in here, on h or on y (`ModelConfig.routing_weight_on_hidden`)."""

    def __init__(self, cfg: ModelConfig, par: ModelParallel):
        super().__init__()
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
        self.num_local = e // par.ep_size
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.w_gate_up = nn.Parameter(torch.empty(self.num_local, d, 2 * f))
        self.w_down = nn.Parameter(torch.empty(self.num_local, f, d))
        ep = dict(shard="ep", dim=0, rank=par.ep_rank, size=par.ep_size)
        place(self.w_gate_up, full_shape=(e, d, 2 * f), init_std=cfg.init_std, parts=("w_gate", "w_up"), **ep)
        place(self.w_down, full_shape=(e, f, d), init_std=out_std, **ep)
        self.use_grouped_mm = False  # set by the trainer (see `can_use_grouped_mm`)
        self.scale_hidden = cfg.routing_weight_on_hidden  # the routing weight scales h (M, F), else y (M, D)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor | None = None,
                padded: bool = False) -> torch.Tensor:
        """x (M, D) rows grouped by local expert; counts (E_local,) rows per expert; weight (M,) each
        row's routing weight, or None (unweighted) -> (M, D). padded: rows past counts.sum() are padding
        (`sort_by_expert`) that no GEMM writes: masked in and out (masked_fill, as 0 x NaN is NaN) to 0, no gradient."""
        if self.use_grouped_mm:
            # autocast does not cover torch._grouped_mm: cast to the autocast dtype by hand
            dtype = compute_dtype(x)
            x = x.to(dtype)
            w = None if weight is None else weight.to(dtype)[:, None]  # (M, 1)
            offs = counts.cumsum(0, dtype=torch.int32)  # (E_local,) end row of each expert, stays on device
            pad = torch.arange(x.shape[0], device=x.device)[:, None] >= offs[-1] if padded else None  # (M, 1)
            x = x if pad is None else x.masked_fill(pad, 0)
            gate_up = torch._grouped_mm(x, self.w_gate_up.to(dtype), offs=offs)  # (M, 2F)
            h = SwiGLU.apply(gate_up)  # (M, F)
            if w is not None and self.scale_hidden:
                h = h * w
            y = _ContiguousGrad.apply(torch._grouped_mm(_ContiguousGrad.apply(h), self.w_down.to(dtype), offs=offs))
            y = y * w if w is not None and not self.scale_hidden else y  # (M, D)
            return y if pad is None else y.masked_fill(pad, 0)
        return self.loop(x, None, weight, counts, x.shape[0])

    def gather_and_combine(self, tokens: torch.Tensor, rows: Assignments) -> torch.Tensor:
        """Dispatch, experts and combine in one pass: out[t] = sum over rows r of token t of
        weight_r * expert_r(tokens[t]). tokens (n, D); rows sorted by expert -> (n, D)."""
        return self.loop(tokens, rows.token, rows.weight, rows.counts, tokens.shape[0])

    def loop(self, x: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor | None,
             counts: torch.Tensor, num_out: int) -> torch.Tensor:
        """`ExpertLoop` in the autocast dtype (autocast does not reach inside a custom autograd Function)."""
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return ExpertLoop.apply(x.to(dtype), rows, None if weight is None else weight.to(dtype),
                                     counts.tolist(), self.w_gate_up.to(dtype), self.w_down.to(dtype), num_out,
                                     self.scale_hidden)


def grouped_mm_strides_ok(cfg: ModelConfig, dtype: torch.dtype) -> bool:
    """Whether every row stride torch._grouped_mm would see is a multiple of 16 bytes."""
    elt = torch.finfo(dtype).bits // 8
    return (cfg.hidden_size * elt) % 16 == 0 and (cfg.moe_ffn_hidden_size * elt) % 16 == 0


def can_use_grouped_mm(device: torch.device, cfg: ModelConfig, dtype: torch.dtype) -> bool:
    """torch._grouped_mm on CUDA (Hopper or newer) when every row stride is a multiple of 16 bytes."""
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return grouped_mm_strides_ok(cfg, dtype)


# ------------------------------------------------------------------ expert dispatcher
@dataclass
class DispatchPlan:
    """What the combine step needs to send expert outputs back (split sizes, row order)."""

    send_splits: list[int]  # rows this rank sent to each EP rank
    recv_splits: list[int]  # rows this rank received from each EP rank
    sort: torch.Tensor  # (M,) groups the received rows by local expert
    unsort: torch.Tensor  # (M,) puts expert-grouped rows back in received order


def dispatch_to_experts(x_sorted: torch.Tensor, counts: torch.Tensor, par: ModelParallel):
    """Send rows (grouped by global expert id) to the EP rank that owns each expert.

    x_sorted (A, D) rows sorted by expert id, then any padding rows, which stay here (`sort_by_expert`);
    counts (E,) rows per global expert.
    Returns rows grouped by *local* expert (M, D), rows per local expert (E_local,) and the plan
    for `combine_from_experts`. Expert e lives on EP rank e // E_local."""
    ep = par.ep_size
    e_local = counts.numel() // ep
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=par.ep_group)  # (EP*E_local,) [src, local expert]
    # The one host synchronisation of EP: all_to_all needs the split sizes as Python ints.
    send_splits = counts.view(ep, e_local).sum(1).tolist()
    recv_by_src = recv_counts.view(ep, e_local)  # (EP, E_local)
    recv_splits = recv_by_src.sum(1).tolist()
    x_recv = all_to_all(x_sorted[:sum(send_splits)], recv_splits, send_splits, par.ep_group)  # (M, D) by source rank
    # Rows arrive grouped by source, then by expert; regroup by local expert for the GEMMs.
    expert_of_row = torch.repeat_interleave(
        torch.arange(e_local, device=counts.device).repeat(ep), recv_by_src.reshape(-1))  # (M,)
    sort = torch.argsort(expert_of_row, stable=True)  # (M,)
    plan = DispatchPlan(send_splits, recv_splits, sort, torch.argsort(sort))
    return x_recv.index_select(0, sort), recv_by_src.sum(0), plan  # (M, D), (E_local,)


def dispatch_along(t: torch.Tensor, plan: DispatchPlan, par: ModelParallel) -> torch.Tensor:
    """A per-row tensor (A, ...) sent where `dispatch_to_experts` sent the rows -> (M, ...) by local expert."""
    sent = t[:sum(plan.send_splits)]  # without padding rows
    return all_to_all(sent, plan.recv_splits, plan.send_splits, par.ep_group).index_select(0, plan.sort)


def combine_from_experts(y: torch.Tensor, plan: DispatchPlan, par: ModelParallel) -> torch.Tensor:
    """Inverse of `dispatch_to_experts`: (M, D) expert outputs -> (A, D) in the sender's order."""
    y = y.index_select(0, plan.unsort)  # (M, D) back in received order
    return all_to_all(y, plan.send_splits, plan.recv_splits, par.ep_group)  # (A, D)


# ------------------------------------------------------------------------- MoE layer
@dataclass
class MoEStats:
    """Router losses and loads of one MoE layer on one micro-batch (this rank's share)."""

    aux_loss: torch.Tensor  # scalar, load-balancing loss (before its coefficient)
    z_loss: torch.Tensor  # scalar, router z-loss (before its coefficient)
    counts: torch.Tensor  # (E,) rows each expert computed for this rank's tokens (its load)
    routed: torch.Tensor  # (E,) the router's top-K choices of this rank's tokens (before capacity)
    dropped: torch.Tensor | None  # scalar, assignments dropped by the capacity limit; None without one


@dataclass
class Assignments:
    """The (token, expert, weight) rows an MoE layer computes, sorted by expert."""

    token: torch.Tensor  # (A,) local token index of each row
    weight: torch.Tensor  # (A,) fp32 combine weight
    counts: torch.Tensor  # (E,) rows per expert; they are the first counts.sum() rows
    padded: bool = False  # rows after them are padding (`sort_by_expert`)


def sort_by_expert(token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, num_experts: int,
                   counts: torch.Tensor | None = None, pad: torch.Tensor | None = None) -> Assignments:
    """Group rows by expert (stable: rows of one expert stay in token order); `counts` (E,) are the rows per expert
    when the caller has counted them already. pad (A,) bool: rows not to compute (dropped); they go last as
    padding of weight 0 that no expert computes. Padding, not removing them, keeps every shape fixed:
    `token[~pad]` would wait for the GPU (a host sync)."""
    if pad is not None:
        expert, weight = expert.masked_fill(pad, num_experts), weight.masked_fill(pad, 0.0)
    order = torch.argsort(expert, stable=True)  # (A,)
    if counts is None:
        counts = count_per_expert(expert, num_experts + (pad is not None))[:num_experts]
    return Assignments(token[order], weight[order], counts, pad is not None)


def priority(scores: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Integer ranking key of (score, token): the score quantised to 2^-16, ties to the earlier token.

    Exact ties are common (tokens with identical contexts have identical hidden states), and float
    rounding differs between parallel layouts, so ranking by the raw float would keep a different
    token of a tie on each layout; the quantised key ranks them the same everywhere."""
    return torch.floor(scores * 65536).long() * num_tokens + (num_tokens - 1 - token)  # x 2^16 is exact


def capacity_keep_mask(keys: torch.Tensor, indices: torch.Tensor, capacity: int, num_experts: int,
                       counts: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) bool: which assignments fit, each expert keeping its `capacity` best-ranked ones.

    keys, indices (N, K): the `priority` and expert of every assignment of the micro-batch; counts (E,) those
    per expert, if counted. Lowest-scored assignments are dropped first (Switch Transformer drops by arrival
    order; dropping by score keeps each expert's most confident tokens, as GShard's priority routing)."""
    flat_e, flat_s = indices.reshape(-1), keys.reshape(-1)  # (A,) keys >= 0, and distinct
    span = flat_s.max() + 1
    order = torch.argsort(flat_e * span - flat_s)  # one sort: grouped by expert, best first
    counts = count_per_expert(flat_e, num_experts) if counts is None else counts
    starts = counts.cumsum(0) - counts  # (E,) first row of each expert in `order`
    rank = torch.empty_like(flat_e)
    rank[order] = torch.arange(flat_e.numel(), device=flat_e.device) - starts[flat_e[order]]
    return (rank < capacity).view_as(indices)


def sequence_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                            seq_of_token: torch.Tensor, counts_seq: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Sequence-wise balancing loss (DeepSeek-V3, eq. 17-20): the Switch loss of each sequence, averaged.

    probs (n, E), indices (n, K), seq_of_token (n,) sequence of each token; counts_seq (B, E)
    top-K choices per sequence and expert over the whole micro-batch. Returns this rank's share."""
    num_seqs = counts_seq.shape[0]
    f = counts_seq.float() / (seq_len * indices.shape[1])  # (B, E)
    p = torch.zeros(num_seqs, num_experts, device=probs.device).index_add_(0, seq_of_token, probs) / seq_len
    return num_experts * (f * p).sum() / num_seqs


class SparseMoELayer(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer: dropless top-k by default.

    forward(x (B, T, D)) -> (y (B, T, D), MoEStats), in four steps:
      1. route:    the router scores experts per token (fp32) and `assign` turns the scores into
                   (token, expert, weight) rows: top-K per token (dropless, or within a capacity),
                   top-C tokens per expert (expert choice), or round-robin (forced balance).
      2. dispatch: rows are sorted by expert, so each expert's rows are contiguous; under EP they
                   travel by all-to-all to the rank holding the expert.
      3. experts:  each local expert runs once on its block of rows (dropless top-k as in MegaBlocks,
                   Gale et al. 2022; rows a capacity drops stay as padding, never computed).
      4. combine:  rows come back (the experts scaled them by their weight) and are summed per token; shared
                   experts (DeepSeekMoE, Dai et al. 2024), if any, add a dense SwiGLU of all tokens.
    Without EP and grouped GEMMs (the CPU), steps 2-4 run in one pass of `ExpertLoop`: each expert gathers
    its own rows and adds its weighted outputs into their tokens' rows. Under TP the ranks hold the same N
    tokens; each routes only its N/TP slice and the outputs are all-gathered, so no token is computed or
    counted twice. Under sequence parallelism each TP rank already holds only its slice (B, T/TP, D): it
    routes it and keeps the output, no split, no gather. Decisions that need the whole micro-batch
    (capacity, expert choice) see every TP rank's scores and rank ties by each token's global index in the
    micro-batch, so they do not depend on which rank holds a token. The returned losses are this rank's
    share of the micro-batch losses (they add up over TP ranks)."""

    def __init__(self, cfg: ModelConfig, par: ModelParallel):
        super().__init__()
        self.par = par
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_token
        self.router_type = cfg.router_type
        self.aux_loss_type = cfg.router_aux_loss_type
        self.capacity_factor = cfg.moe_capacity_factor
        self.jitter = cfg.router_jitter_noise
        self.router = Router(cfg)
        self.experts = Experts(cfg, par)
        self.shared_experts = DenseMLP(cfg, par, cfg.shared_ffn_hidden_size) if cfg.num_shared_experts else None
        self.global_counts: torch.Tensor | None = None  # (E,) set by the trainer for global-batch balancing

    def assign(self, r: RouterOutput, ids: torch.Tensor, num_tokens: int,
               routed: torch.Tensor) -> tuple[Assignments, torch.Tensor | None]:
        """Rows to compute for this rank's n tokens, and drops. ids (n,): each token's global index
        in the micro-batch (b * T + position), which ranks ties and numbers tokens whatever the layout;
        routed (E,): the router's top-K choices per expert, the rows per expert when none is dropped."""
        k, e, device, n = self.top_k, self.num_experts, r.logits.device, ids.shape[0]
        local = torch.arange(n, device=device)
        first = n * self.par.tp_rank  # this rank's first row in gather_tp_rows' order (rank after rank)
        dropped = None  # no capacity limit: nothing to count (and no kernel to count it)
        if self.router_type == "round-robin":  # token g takes experts gK .. gK+K-1 (mod E), weight 1/K
            experts = (ids[:, None] * k + torch.arange(k, device=device)) % e  # (n, K)
            weight = torch.full((n * k,), 1.0 / k, device=device)
            return sort_by_expert(local.repeat_interleave(k), experts.reshape(-1), weight, e), dropped
        if self.router_type == "expert-choice":  # each expert takes its C best tokens (Zhou et al. 2022)
            capacity = min(num_tokens, math.ceil((self.capacity_factor or 1.0) * num_tokens * k / e))
            scores = gather_tp_rows(r.scores.detach(), self.par)  # (N, E) the whole micro-batch
            keys = priority(scores, gather_tp_rows(ids, self.par)[:, None], num_tokens)  # (N, E)
            chosen = keys.topk(capacity, dim=0).indices  # (C, E) each expert's best rows
            token = chosen.T.reshape(-1)  # (E*C,) rows of the gathered micro-batch, expert-major
            expert = torch.arange(e, device=device).repeat_interleave(capacity)
            theirs = None if self.par.tp_size == 1 else (token < first) | (token >= first + n)  # (E*C,)
            token = token if theirs is None else (token - first).masked_fill(theirs, 0)  # theirs: padding
            return sort_by_expert(token, expert, r.scores[token, expert], e, pad=theirs), dropped
        token, expert, weight = local.repeat_interleave(k), r.indices.reshape(-1), r.weights.reshape(-1)
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * num_tokens * k / e)
            keys = priority(r.scores.gather(1, r.indices).detach(), ids[:, None], num_tokens)  # (n, K)
            whole = self.par.tp_size == 1  # this rank routes the whole micro-batch: `routed` counts it
            drop = ~capacity_keep_mask(gather_tp_rows(keys, self.par), gather_tp_rows(r.indices, self.par), capacity,
                                       e, routed if whole else None)[first:first + n].reshape(-1)  # (A,)
            kept = routed.clamp(max=capacity) if whole else None  # (E,) each expert keeps its best `capacity`
            return sort_by_expert(token, expert, weight, e, kept, pad=drop), drop.sum()
        return sort_by_expert(token, expert, weight, e, routed), dropped

    def balancing_loss(self, r: RouterOutput, routed: torch.Tensor, ids: torch.Tensor, num_tokens: int,
                       seq_len: int) -> torch.Tensor:
        """This rank's share of the load-balancing loss of the micro-batch (see README_MOE.md);
        ids (n,) the global index of each of this rank's tokens."""
        if self.aux_loss_type == "sequence":
            seq_of_token = ids // seq_len  # (n,)
            num_seqs = num_tokens // seq_len
            # (sequence, expert) pairs numbered s * E + e, counted like experts
            counts_seq = count_per_expert(seq_of_token[:, None] * self.num_experts + r.indices,
                                          num_seqs * self.num_experts)
            if self.par.tp_size > 1:
                dist.all_reduce(counts_seq, group=self.par.tp_group)  # f per sequence over all its tokens
            return sequence_balancing_loss(r.probs, r.indices, self.num_experts, seq_of_token,
                                           counts_seq.view(num_seqs, self.num_experts), seq_len)
        counts = routed
        if self.par.tp_size > 1:
            counts = routed.clone()
            dist.all_reduce(counts, group=self.par.tp_group)  # f_i over the whole micro-batch
        if self.aux_loss_type == "global-batch" and self.global_counts is not None:
            counts = self.global_counts  # f_i over the whole global batch (all micro-batches, all DP ranks)
        return load_balancing_loss(r.probs, r.indices, self.num_experts, counts, num_tokens)

    def forward(self, x: torch.Tensor, noise_seed: int | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x (B, T, D), or this rank's slice (B, T/TP, D) under sequence parallelism -> y of x's shape."""
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)  # (B*t, D)
        if self.par.sequence_parallel:  # rank r holds positions r*t .. (r+1)*t - 1 of every sequence
            seq_len = t * self.par.tp_size
            ids = (torch.arange(b, device=x.device)[:, None] * seq_len + self.par.tp_rank * t
                   + torch.arange(t, device=x.device)).reshape(-1)  # (n,) n = B*T/TP
        else:
            seq_len = t
            if self.par.tp_size > 1:
                tokens = split_tokens(tokens, self.par)  # (n, D), n = N / TP, a contiguous chunk
            first = tokens.shape[0] * self.par.tp_rank
            ids = torch.arange(first, first + tokens.shape[0], device=x.device)  # (n,)
        n = tokens.shape[0]
        num_tokens = n * self.par.tp_size  # N

        # 1. route
        router_in = tokens
        if self.jitter > 0 and self.training and noise_seed is not None:
            # The noise of a token depends on (seed, step, micro-batch, layer, token) only, not on the layout.
            gen = torch.Generator(device=x.device).manual_seed(noise_seed % 2**64)  # generators take 64 bits
            noise = torch.empty(num_tokens, d, device=x.device).uniform_(1 - self.jitter, 1 + self.jitter,
                                                                         generator=gen)
            router_in = tokens * noise[ids].to(tokens.dtype)
        r = self.router(router_in)
        routed = count_per_expert(r.indices, self.num_experts)  # (E,)
        rows, dropped = self.assign(r, ids, num_tokens, routed)

        if self.par.ep_size > 1 or self.experts.use_grouped_mm:
            # 2. dispatch
            x_sorted = tokens.index_select(0, rows.token)  # (A, D); index_select: faster backward than []
            if self.par.ep_size > 1:
                x_local, local_counts, plan = dispatch_to_experts(x_sorted, rows.counts, self.par)
                w_local = dispatch_along(rows.weight, plan, self.par)  # (M,) the weights travel with their rows
            else:
                x_local, local_counts, w_local = x_sorted, rows.counts, rows.weight

            # 3. experts (each row's output scaled by its routing weight; padding, kept only without EP, gives 0)
            y_local = self.experts(x_local, local_counts, w_local, rows.padded and self.par.ep_size == 1)  # (M, D)

            # 4. combine: out[t] = sum of token t's rows; index_add (un-permute + K-sum: worse compiled, README_MOE)
            y_sorted = combine_from_experts(y_local, plan, self.par) if self.par.ep_size > 1 else y_local  # (A', D)
            out = y_sorted.new_zeros(n, d).index_add_(0, rows.token[:y_sorted.shape[0]], y_sorted)  # (n, D)
        else:
            # 2.-4. in one pass on the CPU (ExpertLoop, below: equal to the steps above): each expert
            # gathers its own rows and adds its weighted outputs into their tokens' rows, no (A, D) copies
            out = self.experts.gather_and_combine(tokens, rows)  # (n, D)
        if self.par.tp_size > 1 and not self.par.sequence_parallel:
            out = gather_tokens(out, self.par)  # (N, D)
        out = out.view(b, t, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)  # (B, T, D), every token; SP: (B, T/TP, D), gathered inside
        # The router losses last: their dozen small kernels queue behind the experts' GEMMs rather
        # than hold the GPU idle between routing and dispatch while the host launches them.
        stats = MoEStats(aux_loss=self.balancing_loss(r, routed, ids, num_tokens, seq_len),
                         z_loss=router_z_loss(r.logits, num_tokens), counts=rows.counts.detach(),
                         routed=routed, dropped=dropped)
        return out, stats


# ---------------------------------------------------- the CPU fast path of the experts
class ExpertLoop(torch.autograd.Function):
    """SwiGLU experts run one after another on rows grouped by expert, with a hand-written backward:
    SparseMoELayer's steps 2-4 (dispatch, experts, combine) in one pass, the CPU's fast path. Equal to
    the plain path above and to a per-token loop, gradcheck included (tests/test_model.py).

    forward(x (S, D), rows (M,) or None, weight (M,) or None, splits (E_local ints, sum M),
            w_gate_up (E_local, D, 2F), w_down (E_local, F, D), num_out, scale_hidden) -> (num_out, D)
    Expert e owns rows s_e .. s_e + c_e - 1 (c_e = splits[e]) of the grouped order; rows and
    weight may hold padding after the M real rows (`sort_by_expert`): never read, 0 gradient.
    rows given (dispatch and combine fused in): expert e reads x[rows[s_e : s_e + c_e]] and adds
    its outputs into those rows of a zero (num_out, D) output. rows None: it reads x[s_e : s_e + c_e]
    and writes the same output rows. weight given: each row's output is scaled by it, on the
    hidden h (scale_hidden) or on the output y (`ModelConfig.routing_weight_on_hidden`).
    Why by hand: autograd of the plain loop saves an (M, D) gathered copy of the tokens, concatenates the
    experts' outputs and stacks E_local weight gradients. Here each expert gathers its rows into a small,
    cache-hot block, writes its outputs and its weight gradients straight into preallocated tensors, and the
    backward gathers the rows again. The arithmetic is autograd's, operation for operation (weights applied as
    `Experts` applies them, index_add_ in expert order): one process rounds as the expert-parallel path. One
    dtype throughout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor | None,
                splits: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor, num_out: int,
                scale_hidden: bool = False) -> torch.Tensor:
        m, f = sum(splits), w_down.shape[1]
        on_y = weight is not None and not scale_hidden  # the weights' gradient then needs y unweighted
        w_gate, w_up = w_gate_up.chunk(2, dim=-1)  # (E_local, D, F) views of the fused weight
        gate, up = x.new_empty(m, f), x.new_empty(m, f)  # (M, F) pre-activations, kept for backward
        y = x.new_empty(m, x.shape[1])  # (M, D) expert outputs (unweighted when on_y)
        out = y if rows is None and not on_y else x.new_zeros(num_out, x.shape[1])  # (num_out, D)
        s = 0
        for e, c in enumerate(splits):
            if c == 0:
                continue
            xe = x[s:s + c] if rows is None else x.index_select(0, rows[s:s + c])  # (c, D)
            # gate and up as two products, as before they were one weight: the same rounding (parity
            # tests compare layouts whose experts see different row counts); the CPU gains nothing from one
            g = torch.mm(xe, w_gate[e], out=gate[s:s + c])  # (c, F)
            h = F.silu(g) * torch.mm(xe, w_up[e], out=up[s:s + c])  # (c, F)
            if weight is not None and scale_hidden:
                h = h * weight[s:s + c, None]
            ye = torch.mm(h, w_down[e], out=y[s:s + c])  # (c, D)
            if on_y:
                ye = ye * weight[s:s + c, None]
            if rows is not None:
                out.index_add_(0, rows[s:s + c], ye)  # a token's K rows add up
            elif on_y:
                out[s:s + c] = ye
            s += c
        ctx.splits, ctx.scale_hidden = splits, scale_hidden
        ctx.save_for_backward(x, rows, weight, w_gate_up, w_down, gate, up, y if on_y else None)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rows, weight, w_gate_up, w_down, gate, up, y = ctx.saved_tensors
        w_gate, w_up = w_gate_up.chunk(2, dim=-1)  # (E_local, D, F) views
        grad = grad.contiguous()  # (num_out, D)
        grad_x = torch.empty_like(x) if rows is None else torch.zeros_like(x)  # (S, D)
        grad_gate_up, grad_down = torch.empty_like(w_gate_up), torch.empty_like(w_down)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)  # (E_local, D, F) views: written in place
        grad_weight = None if weight is None else torch.zeros_like(weight)  # (M,) and 0 for padding rows
        s = 0
        for e, c in enumerate(ctx.splits):
            if c == 0:  # an expert without rows gets a zero gradient, as autograd would give it
                grad_gate_up[e].zero_(), grad_down[e].zero_()
                continue
            if rows is None:
                xe, grad_y = x[s:s + c], grad[s:s + c]  # (c, D)
            else:
                xe, grad_y = x.index_select(0, rows[s:s + c]), grad.index_select(0, rows[s:s + c])  # (c, D)
            if y is not None:  # weighted on y: d/dw of w * y, and the gradient reaching y
                grad_weight[s:s + c] = (grad_y * y[s:s + c]).sum(1)
                grad_y = grad_y * weight[s:s + c, None]  # (c, D)
            g, u = gate[s:s + c], up[s:s + c]  # (c, F)
            act = F.silu(g)  # recomputed: cheaper than keeping another (M, F) tensor
            h = act * u  # (c, F)
            grad_h = grad_y @ w_down[e].T  # (c, F)
            if weight is not None and ctx.scale_hidden:  # weighted on h: d/dw of w * h, and the gradient reaching h
                torch.mm((h * weight[s:s + c, None]).T, grad_y, out=grad_down[e])  # (F, D)
                grad_weight[s:s + c] = (grad_h * h).sum(1)
                grad_h = grad_h * weight[s:s + c, None]
            else:
                torch.mm(h.T, grad_y, out=grad_down[e])  # (F, D)
            grad_u = grad_h * act
            grad_g = torch.ops.aten.silu_backward(grad_h.mul_(u), g)  # (c, F) silu'(g) * grad_h * u
            torch.mm(xe.T, grad_g, out=grad_gate[e])  # (D, F)
            torch.mm(xe.T, grad_u, out=grad_up[e])  # (D, F)
            grad_xe = grad_g @ w_gate[e].T + grad_u @ w_up[e].T  # (c, D)
            if rows is None:
                grad_x[s:s + c] = grad_xe
            else:
                grad_x.index_add_(0, rows[s:s + c], grad_xe)  # (S, D) a token's K rows add up
            s += c
        return grad_x, None, grad_weight, None, grad_gate_up, grad_down, None, None


# ----------------------------------------------------------------------------- block
class MoETransformerBlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)); mlp is MoE or dense."""

    def __init__(self, cfg: ModelConfig, par: ModelParallel, layer: int):
        super().__init__()
        self.is_moe = layer in cfg.all_moe_layers
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, par)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoELayer(cfg, par) if self.is_moe else DenseMLP(cfg, par)
        # SP: each TP rank normalises only its positions, so the norm weights get partial gradients.
        place(self.input_layernorm.weight, tp_partial_grad=par.sequence_parallel)
        place(self.post_attention_layernorm.weight, tp_partial_grad=par.sequence_parallel)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: dict | None = None, noise_seed: int | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """x (B, T, D), or this rank's slice (B, T/TP, D) under sequence parallelism; rope: (cos, sin)
        of the T positions (`RotaryEmbedding`)."""
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, stats = self.mlp(h, noise_seed)
            return x + y, stats
        return x + self.mlp(h), None


# ------------------------------------------------------------ multi-token prediction
class MultiTokenPrediction(nn.Module):
    """MTP module k of DeepSeek-V3 (Liu et al. 2024, section 2.2): from the previous depth's hidden
    states h^{k-1} (B, T, D) and the embeddings of the tokens k ahead, one block gives h^k.

        h'^k = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])     (2D -> D)
        h^k  = block(h'^k)                                          (MoE when the model is)
        logits of t_{i+k+1} = lm_head(final_layernorm(h^k_i))       (the LM head is the model's, shared)

    The embedding comes first in the concatenation as in the released DeepSeek-V3 weights and
    Megatron-Core (the paper writes h first; the order only permutes eh_proj's columns). Each module
    has its own final norm (DeepSeek-V3's `shared_head.norm`, Megatron's `final_layernorm`).
    eh_proj is replicated over TP: every TP rank holds the whole (B, T, D) hidden states, or under
    sequence parallelism its (B, T/TP, D) slice, when the norms' and eh_proj's gradients are partial."""

    def __init__(self, cfg: ModelConfig, par: ModelParallel, layer: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        place(self.eh_proj.weight, init_std=cfg.init_std)
        self.block = MoETransformerBlock(cfg, par, layer)
        self.final_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        for weight in (self.enorm.weight, self.hnorm.weight, self.eh_proj.weight, self.final_layernorm.weight):
            place(weight, tp_partial_grad=par.sequence_parallel)  # SP: each TP rank sees its positions only

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                noise_seed: int | None) -> tuple[torch.Tensor, MoEStats | None]:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # (B, T, 2D) -> (B, T, D); SP: T/TP
        return self.block(x, rope, None, noise_seed)  # (B, T, D); SP: (B, T/TP, D)


def mtp_input_ids(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Ids that MTP module k reads at each position i: t_{i+k} = targets[:, i + k - 1] (targets are
    the inputs shifted by one). The last k - 1 positions have no such token: they read id 0 and
    their predictions are left out of the loss (as Megatron-Core rolls its inputs and masks)."""
    ids = torch.zeros_like(targets)  # (B, T)
    ids[:, :targets.shape[1] - k + 1] = targets[:, k - 1:]
    return ids


# ----------------------------------------------------------------------- transformer
@dataclass
class ModelOutput:
    # last stage (its last chunk): logits (B, T, V_local), or with head=False the final norm's output;
    # elsewhere: hidden (B, T, D), SP (B, T/TP, D)
    output: torch.Tensor
    aux_loss: torch.Tensor  # scalar, sum over the MoE layers run (0 when none)
    z_loss: torch.Tensor  # scalar, sum over the MoE layers run
    stats: dict[int, MoEStats]  # global layer index -> that MoE layer's stats
    # last stage, given mtp_targets: module k's logits of t_{i+k+1} at positions i < T - k, (B, T - k, V_local)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only MoE language model, or the layers of one pipeline rank of it.

    A pipeline rank holds one chunk of consecutive layers, or under the interleaved schedule several
    non-adjacent chunks (par.chunks), run one at a time by forward(chunk=v). All of a rank's chunks live in this
    one module so that parameter names stay global whatever the layout, and checkpoints, gradient reducers and
    optimizers see one set of weights. Parameter names follow transformers' Qwen3-MoE without the `model.`
    prefix (`layers.3.mlp.router.weight` is its `model.layers.3.mlp.gate.weight`). The MTP modules (`mtp.0.*`,
    ...) live on the last stage; under PP it then holds a copy of the embedding too, initialised equal (by name)
    and kept equal by the trainer, which sums the two copies' gradients over the embedding group. Each copy's
    placement says which stage holds it."""

    def __init__(self, cfg: ModelConfig, par: ModelParallel | None = None, seed: int = 0):
        super().__init__()
        par = par or ModelParallel()
        self.cfg, self.par = cfg, par
        end = cfg.num_layers if par.layer_end < 0 else par.layer_end
        self.chunks = list(par.chunks) or [(par.layer_start, end)]  # [start, end) of each model chunk
        self.layer_ids = [i for start, end in self.chunks for i in range(start, end)]
        mtp = cfg.mtp_num_layers > 0 and par.last_stage
        if par.first_stage or mtp:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par, cfg.init_std)
            if cfg.mtp_num_layers > 0 and par.first_stage != par.last_stage:  # one copy on each end of the pipeline
                place(self.embed_tokens.weight, pipeline_copy="first" if par.first_stage else "last")
        self.layers = nn.ModuleDict({str(i): MoETransformerBlock(cfg, par, i) for i in self.layer_ids})
        if par.last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            place(self.norm.weight, tp_partial_grad=par.sequence_parallel)  # SP: each rank normalises its positions
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, par, cfg.init_std)
        self.mtp = nn.ModuleList([MultiTokenPrediction(cfg, par, i) for i in cfg.mtp_layers] if mtp else [])
        self.rope = RotaryEmbedding(cfg.attn_head_dim, cfg.seq_length, cfg.rope_theta)
        self.recompute = False  # set by the trainer: recompute each block's activations in backward
        layout_free_init_(self, seed)

    def moe_layers(self) -> dict[int, SparseMoELayer]:
        """This stage's MoE layers by global layer index (MTP blocks: num_layers + k - 1)."""
        blocks = {int(i): b for i, b in self.layers.items()}
        blocks.update({self.cfg.num_layers + j: m.block for j, m in enumerate(self.mtp)})
        return {i: b.mlp for i, b in blocks.items() if b.is_moe}

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                kv_caches: list[dict] | None = None, noise_seed: int | None = None, chunk: int = 0,
                mtp_targets: torch.Tensor | None = None, head: bool = True) -> ModelOutput:
        """x: token ids (B, T) into the first stage's first chunk, hidden states (B, T, D) elsewhere
        (this rank's sequence slice (B, T/TP, D) under sequence parallelism).

        chunk: which of this rank's model chunks to run (interleaved schedule; 0 otherwise).
        noise_seed: seeds router jitter (each layer adds its index), given by the trainer per
        micro-batch so that the noise does not depend on the layout.
        mtp_targets: the next-token targets (B, T); given (in training) the last stage's last chunk
        also runs the MTP modules. Without them (generation, evaluation) the MTP modules are ignored."""
        if self.par.first_stage and chunk == 0:
            x = self.embed_tokens(x)  # (B, T, D); SP: (B, T/TP, D)
        if positions is None:  # of the whole sequence: attention gathers it under SP
            seq_len = x.shape[1] * (self.par.tp_size if self.par.sequence_parallel else 1)
            positions = slice(0, seq_len)
        rope = self.rope(positions, compute_dtype(x))  # (cos, sin) (T, Dh), shared by every layer
        all_stats = {}
        for j, layer in enumerate(range(*self.chunks[chunk])):
            block = self.layers[str(layer)]
            seed = None if noise_seed is None else noise_seed * 1009 + layer
            x, stats = self.run_block(block, x, rope, kv_caches[j] if kv_caches is not None else None, seed)
            if stats is not None:
                all_stats[layer] = stats
        last = self.par.last_stage and chunk == len(self.chunks) - 1
        mtp_logits = []
        if last and mtp_targets is not None:
            h, t = x, mtp_targets.shape[1]
            for j, module in enumerate(self.mtp):  # module k = j + 1, sequential: h^k from h^{k-1}
                layer, k = self.cfg.num_layers + j, j + 1
                seed = None if noise_seed is None else noise_seed * 1009 + layer
                emb = self.embed_tokens(mtp_input_ids(mtp_targets, k))  # (B, T, D); SP: (B, T/TP, D)
                h, stats = self.run_block(module, h, emb, rope, seed)
                if stats is not None:
                    all_stats[layer] = stats
                logits, = column_parallel(module.final_layernorm(h), self.par, self.lm_head)  # the shared head
                mtp_logits.append(logits[:, :t - k])  # (B, T - k, V_local): the positions whose t_{i+k+1} exists
        if last:  # head=False (training): (B, T, D), the loss applies the head (lm_head_cross_entropy)
            x = column_parallel(self.norm(x), self.par, self.lm_head)[0] if head else self.norm(x)  # (B, T, V_local)
        # the router losses summed over this chunk's MoE layers: two kernels, not two adds per layer
        aux, z = (torch.stack([getattr(s, f) for s in all_stats.values()]).sum() if all_stats
                  else torch.zeros((), device=x.device) for f in ("aux_loss", "z_loss"))
        return ModelOutput(x, aux, z, all_stats, mtp_logits)

    def run_block(self, block: nn.Module, *args: Any) -> Any:
        """block(*args), or under --recompute in training with activation checkpointing: only the
        inputs are kept and the block reruns during backward (with the same noise seed among its
        args, so the rerun routes exactly as the forward did). Training passes no KV cache."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)
