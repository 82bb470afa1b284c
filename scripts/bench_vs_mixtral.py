"""Training-step throughput of this MoE against transformers' Mixtral on the same configuration.

    python scripts/bench_vs_mixtral.py                    # the trainer's default model, CPU
    python scripts/bench_vs_mixtral.py --hidden-size 256 --micro-batch-size 4 --steps 10

Both models get the same sizes (vocab, hidden, layers, heads, kv heads, 8 experts of the same
width, top-2, untied embeddings), the same random batch and the same AdamW; a step is forward,
cross-entropy (+ the router aux loss with the trainer's coefficient), backward and optimizer
step. Mixtral has no q/k norm and computes its router loss differently, so parameter counts
differ by a few norm weights; both sides are timed alternately in the same process and the
median step is reported. Needs `transformers` (requirements-extras.txt).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_layers import ModelConfig, MoETransformer  # noqa: E402


def main() -> None:
    d = ModelConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--num-attention-heads", type=int, default=d.num_attention_heads)
    p.add_argument("--num-kv-heads", type=int, default=d.num_kv_heads)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=d.moe_ffn_hidden_size)
    p.add_argument("--num-experts", type=int, default=d.num_experts)
    p.add_argument("--num-experts-per-token", type=int, default=d.num_experts_per_token)
    p.add_argument("--seq-length", type=int, default=d.seq_length)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        print("error: transformers is not installed; pip install -r requirements-extras.txt", file=sys.stderr)
        sys.exit(2)

    cfg = ModelConfig(hidden_size=args.hidden_size, num_layers=args.num_layers,
                      num_attention_heads=args.num_attention_heads, num_kv_heads=args.num_kv_heads,
                      moe_ffn_hidden_size=args.moe_ffn_hidden_size, num_experts=args.num_experts,
                      num_experts_per_token=args.num_experts_per_token, seq_length=args.seq_length)
    ours = MoETransformer(cfg, seed=0)
    mixtral = MixtralForCausalLM(MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_token, max_position_embeddings=cfg.seq_length,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01))
    batch = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_length + 1))
    x, y = batch[:, :-1], batch[:, 1:]

    def ours_step(opt: torch.optim.Optimizer) -> None:
        out = ours(x)
        loss = F.cross_entropy(out.output.flatten(0, 1), y.flatten()) + 0.01 * out.aux_loss / len(cfg.moe_layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def mixtral_step(opt: torch.optim.Optimizer) -> None:
        out = mixtral(input_ids=x, labels=batch[:, 1:])  # labels are shifted inside: pass the next tokens
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    opts = {"ours": torch.optim.AdamW(ours.parameters()), "mixtral": torch.optim.AdamW(mixtral.parameters())}
    steps = {"ours": ours_step, "mixtral": mixtral_step}
    times: dict[str, list[float]] = {"ours": [], "mixtral": []}
    for i in range(args.warmup + args.steps):
        for name in ("ours", "mixtral"):  # alternate, so both see the same machine state
            t0 = time.perf_counter()
            steps[name](opts[name])
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = args.micro_batch_size * cfg.seq_length
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, model in (("ours", ours), ("mixtral", mixtral)):
        n = sum(q.numel() for q in model.parameters())
        print(f"{name:8s} {n / 1e6:6.2f} M params | step {med[name] * 1e3:8.1f} ms | {tokens / med[name]:10,.0f} tokens/s")
    print(f"throughput ratio ours / mixtral: {med['mixtral'] / med['ours']:.2f}x "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
