"""Sample text from a checkpoint, with a KV cache.

    python scripts/generate.py --checkpoint out/ckpt --prompt "def main(" --max-new-tokens 200
    python scripts/generate.py --checkpoint out/ckpt --prompt "import " --temperature 0    # greedy
    python scripts/generate.py --checkpoint out/bpe --prompt "def " --tokenizer data/bpe   # another tokenizer
    python scripts/generate.py --checkpoint out/tok --prompt-ids 17,4,99                 # ids in, ids out

Tokens: --prompt is text, encoded with the run's tokenizer: the one of the --data folder stored in
the checkpoint's train config (data.load_tokenizer: bytes for the built-in corpus and text, the
meta.json's tokenizer for prepared data), or --tokenizer (bytes, a prepared data folder, or a
tokenizer.json); the prompt and the new tokens are printed decoded (invalid UTF-8 as U+FFFD).
--prompt-ids takes and prints ids (any vocabulary). Generation stops after the tokenizer's
end-of-document id (eos_id in meta.json; kept in the ids, not printed in the text).
Sampling: logits / temperature (0 = greedy argmax), keep the top-k, then the smallest set of
most likely tokens whose probability reaches top-p (nucleus sampling, Holtzman et al. 2020),
and draw from a torch.Generator seeded by --seed: a seed gives the same text every time.
Any temperature > 0 and top-p in (0, 1] sample: a temperature as small as 1e-40 is greedy in
effect (ties shared), and top-p keeps at least the most likely token.
KV cache (default): the prompt runs once at positions 0..T-1 and fills one cache per layer with
its keys and values; each new token then runs alone at its own position and attends to the
cache, so it costs one position instead of the whole sequence. --no-cache recomputes the
sequence for every token (the slow, obvious reference).
Length: a prompt longer than seq_length is refused (exit 2); the rotary table has seq_length
positions. With the cache, generation stops (with a note) once a token would need position
seq_length; without it the model reads the last seq_length tokens (a sliding window), so it
goes on. Up to that point both give the same tokens (with dropless token-choice routing; it
prints a note for routers whose choices depend on the other tokens of a pass).
The decoding itself (sampling.py) is the trainer's too: --sample-interval prints, at a step, what
`--temperature 0` prints for that step's checkpoint.
Bad input (a sampling flag out of range or not finite, a prompt that is empty, too long or
outside the vocabulary, a checkpoint that is not a whole, finite model of this code) is one
`error:` line, exit 2, before anything is sampled.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402
import data  # noqa: E402
from moe_layers import ModelConfig, MoETransformer  # noqa: E402
from sampling import check_prompt, decode_text, generate  # noqa: E402  (decoding, shared with the trainer)
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

def load_model(path: str, device: str = "cpu") -> MoETransformer:
    """The whole model of a checkpoint of any layout, in eval mode."""
    ckpt = ckpt_io.read_checkpoint(path)
    cfg = ModelConfig(**ckpt.meta["model"])
    try:
        cfg.validate()  # a checkpoint of another kind fails here, before anything is built
    except ValueError as e:
        raise ckpt_io.CheckpointError(f"{ckpt.path}: its model config is invalid ({e})") from None
    # Multi-token prediction modules only add a training loss: generation builds the model without them.
    model = MoETransformer(dataclasses.replace(cfg, mtp_num_layers=0))
    ckpt_io.load_into(ckpt, model, None)  # takes the weights the model has (the mtp.* entries stay unread)
    return model.to(device).eval()


def run_tokenizer(checkpoint: str, override: str | None, vocab: int,
                  needed: bool) -> data.ByteTokenizer | data.TextTokenizer | None:
    """--tokenizer, else the run's tokenizer (checkpoint.carried_tokenizer);
    None when there is none that fits the model's vocabulary and the prompt is ids (not `needed`)."""
    if override == "bytes":
        tokenizer = data.ByteTokenizer()
    elif override is not None and os.path.isfile(override):  # a bare tokenizer.json
        tokenizer = data.TextTokenizer(override, None, None)
        tokenizer.eos_id = data.find_eos_id(tokenizer.tokenizer)
    elif override is not None:
        if not os.path.isfile(os.path.join(override, "meta.json")):
            raise ValueError(f"--tokenizer {override}: give bytes, a tokenizer.json or a folder prepared by "
                             f"scripts/prepare_data.py")
        tokenizer = data.load_tokenizer(override)
    else:  # the copy the checkpoint carries (or, saved before that, its --data folder's)
        try:
            tokenizer = ckpt_io.carried_tokenizer(*ckpt_io.read_meta(checkpoint))
        except ckpt_io.CheckpointError:
            if needed:
                raise
            return None
        if tokenizer is None:
            if needed:
                raise ValueError("the checkpoint names no tokenizer (token files without one); give --tokenizer")
            return None  # ids in, ids out: no tokenizer, no stop at eos
    if override is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"--tokenizer {override}: {tokenizer.vocab_size} tokens, more than the model's {vocab}")
    return tokenizer if tokenizer.vocab_size <= vocab else None


def parse_prompt(args: argparse.Namespace, tokenizer: data.ByteTokenizer | data.TextTokenizer | None,
                 vocab: int, seq_length: int) -> list[int]:
    """The prompt's token ids; raises ValueError saying which flag to change."""
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"the model's vocabulary has {vocab} tokens and its run's tokenizer is not known or "
                             f"does not fit it; give --tokenizer or --prompt-ids")
        prompt = tokenizer.encode(args.prompt)
    else:
        try:
            prompt = [int(i) for i in args.prompt_ids.split(",")]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    return check_prompt(prompt, vocab, seq_length, "--prompt" if args.prompt is not None else "--prompt-ids")


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a --save folder (follows `latest`) or one step folder")
    p.add_argument("--prompt", default=None, help="text prompt, encoded with the run's tokenizer")
    p.add_argument("--tokenizer", default=None,
                   help="bytes, a prepared data folder or a tokenizer.json (default: the run's --data)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids (any vocabulary)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most likely tokens up to this mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    args = p.parse_args()

    # Bad flags, a checkpoint of another kind or a bad prompt: one `error:` line, exit 2, before sampling.
    try:
        checks = [
            ((args.prompt is None) != (args.prompt_ids is None), "give exactly one of --prompt and --prompt-ids"),
            (math.isfinite(args.temperature) and args.temperature >= 0,
             f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}"),
            (args.top_k >= 0, f"--top-k must be >= 0 (0 keeps all), got {args.top_k}"),
            (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),  # also refuses nan
            (args.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
            (0 <= args.seed < 2**63, f"--seed must be in [0, 2**63), got {args.seed}"),
            (args.device == "cpu" or torch.cuda.is_available(), "--device cuda: no GPU is visible; use --device cpu"),
            (os.path.isdir(args.checkpoint), f"--checkpoint {args.checkpoint}: no such folder"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        model = load_model(args.checkpoint, args.device)
        if not all(t.isfinite().all() for t in model.state_dict().values()):
            raise ValueError(f"--checkpoint {args.checkpoint}: the weights hold NaN or Inf; load an earlier one")
        vocab, seq_length = model.cfg.vocab_size, model.cfg.seq_length
        tokenizer = run_tokenizer(args.checkpoint, args.tokenizer, vocab, args.prompt is not None)
        prompt = parse_prompt(args, tokenizer, vocab, seq_length)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, TypeError) as e:  # a meta.json whose model config is not ours
        print(f"error: --checkpoint {args.checkpoint}: not a model this code builds ({type(e).__name__}: {e})",
              file=sys.stderr)
        sys.exit(2)

    cfg = model.cfg
    if cfg.num_experts and (getattr(cfg, "router_type", "topk") != "topk" or getattr(cfg, "moe_capacity_factor", 0)):
        print("note: with expert-choice / round-robin routing or a capacity limit, an expert's tokens depend on "
              "the other tokens of a forward pass, so cached (one token per pass) and full passes can differ",
              file=sys.stderr)
    t0 = time.time()
    eos_id = tokenizer.eos_id if tokenizer is not None else None
    new, stopped = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.seed, use_cache=not args.no_cache, eos_id=eos_id)
    dt = time.time() - t0
    if args.prompt is not None:
        print(decode_text(tokenizer, prompt, new))
    else:
        print(",".join(str(i) for i in prompt + new))
    if stopped:
        print(f"note: stopped after {len(new)} new tokens at seq_length {seq_length} (the end of the rotary "
              f"table); --no-cache slides a window instead", file=sys.stderr)
    print(f"{len(new)} tokens in {dt:.2f}s ({len(new) / max(dt, 1e-9):.1f} tokens/s, "
          f"KV cache {'off' if args.no_cache else 'on'})", file=sys.stderr)


if __name__ == "__main__":
    main()
