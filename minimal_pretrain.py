"""Pretrain a sparse Mixture-of-Experts language model with DP / TP / PP / EP wired by hand.

    python minimal_pretrain.py                                  # one process, built-in corpus
    torchrun --nproc_per_node=8 minimal_pretrain.py --tensor-parallel-size 2 \
        --pipeline-parallel-size 2 --num-microbatches 4          # TP2 x PP2 x DP2, EP2

The story is told in main(): config -> distributed setup -> data -> model -> optimizer and
schedule -> training loop -> teardown. Every collective is visible where it happens.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

import checkpoint as ckpt_io
from data import Corpus, DataError, get_batch, load_corpus, unigram_entropy
from memory import (NotEnoughMemory, check_memory, describe_plan, estimate_rank_bytes, layers_text,
                    optimizer_bytes_per_rank, params_per_stage)
from metrics import HEALTH_FIELDS, RunLog, load_health, print_run_summary
from moe_layers import ModelConfig, MoETransformer, can_use_grouped_mm
from parallel_layers import ModelParallel, chunk_layers, vocab_parallel_cross_entropy
from optim import DistributedAdamW, FlatBucket, LRSchedule, build_optimizer, lr_schedule


# =========================================================================== config
class ConfigError(ValueError):
    """Bad flags or layout, the same on every rank: one `error:` line, exit status 2, at once."""


class LocalInputError(ConfigError):
    """Bad input found in this rank's own files or machine (--save, --metrics-file, memory, GPUs).

    Another node may not see it, so ranks agree before exiting (see fail_together), as they
    do for data (DataError) and checkpoint (CheckpointError) problems."""


def arg(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that also carries its command-line help."""
    return field(default=default, metadata={"help": help, **kw})


def field_kind(f: dataclasses.Field) -> type:
    """int, float, str or bool: a config field's type (annotations are strings under `from __future__`)."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "str": str, "bool": bool}[name]


@dataclass
class TrainConfig:
    """Everything about a run that is not the model itself."""

    tensor_parallel_size: int = arg(1, "TP ranks splitting heads, FFN columns and the vocabulary")
    pipeline_parallel_size: int = arg(1, "PP stages splitting the layers (1F1B schedule)")
    num_layers_per_virtual_stage: int = arg(0, "interleaved 1F1B: layers per model chunk; each PP rank holds "
                                               "--num-layers / (PP x this) non-adjacent chunks (virtual stages), "
                                               "which divides the pipeline bubble by that many; 0: one chunk")
    expert_parallel_size: int = arg(0, "EP ranks splitting the experts; 0 means the TP size")
    sequence_parallel: bool = arg(False, "with TP: keep the residual stream, norms and router inputs split by "
                                         "sequence over the TP ranks (all-gather before the column-parallel "
                                         "projections, reduce-scatter after the row-parallel ones); needs "
                                         "--tensor-parallel-size > 1 dividing --seq-length")
    num_microbatches: int = arg(1, "micro-batches per step on each DP rank (gradient accumulation)")
    micro_batch_size: int = arg(8, "sequences per micro-batch")
    max_steps: int = arg(400, "optimizer steps")
    lr: float = arg(2e-3, "peak learning rate")
    min_lr: float = arg(2e-4, "learning rate at the end of the decay, and after it")
    warmup_steps: int = arg(-1, "linear warm-up steps; -1: a tenth of the decay steps, at most 2000")
    lr_decay_steps: int = arg(0, "the decay reaches --min-lr at this step; 0: --max-steps. On --load the "
                                 "checkpoint's schedule goes on unless a schedule flag is given")
    lr_schedule: str = arg("cosine", "cosine: decay from the end of the warm-up | wsd: warm-up, stable at --lr, "
                                     "decay over the last --lr-decay-fraction of the decay steps",
                           choices=["cosine", "wsd"])
    lr_decay_fraction: float = arg(0.2, "wsd: the last fraction of the decay steps that decays (0, 1]")
    lr_decay_style: str = arg("sqrt", "wsd: the decay's shape, linear | cosine | sqrt (1 - sqrt(progress), "
                                      "Hägele et al. 2024)", choices=["linear", "cosine", "sqrt"])
    optimizer: str = arg("adamw", "adamw | muon: Muon (orthogonalised momentum) on the hidden layers' matrices, "
                                  "AdamW on embeddings, LM head, norms and routers. On --load: the checkpoint's",
                         choices=["adamw", "muon"])
    weight_decay: float = arg(0.1, "decoupled weight decay of AdamW and Muon (not applied to norms)")
    use_distributed_optimizer: bool = arg(False, "ZeRO stage 1: each rank keeps the AdamW state (and bf16 runs' fp32 "
                                                 "masters) of 1/DP of the dense weights and 1/replicas of its experts; "
                                                 "gradients reduce-scattered, weights all-gathered. No effect at DP 1")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this; 0 disables")
    router_aux_loss_coef: float = arg(0.01, "weight of the load-balancing loss")
    router_z_loss_coef: float = arg(0.001, "weight of the router z-loss")
    mtp_loss_coef: float = arg(0.1, "weight L of the multi-token prediction loss: L / D x sum of the D modules' "
                                    "cross-entropies joins the optimised loss (DeepSeek-V3: 0.3, then 0.1)")
    router_bias_update_rate: float = arg(0.0, "aux-loss-free balancing: after each step move every expert's "
                                              "routing bias by this times sign(mean load - load); 0 = off")
    seed: int = arg(1234, "seed of the initial weights and of every batch")
    data: str = arg("", "text file, folder of text files, or folder with train.bin/val.bin; "
                        "empty: the Python standard library sources")
    eval_interval: int = arg(100, "evaluate every this many steps (and at the end); 0 disables")
    eval_iters: int = arg(10, "global batches per evaluation")
    log_interval: int = arg(10, "log every this many steps")
    metrics_file: str = arg("", "write JSON lines of train and eval metrics here (rank 0)")
    tensorboard: str = arg("", "also write the metrics as TensorBoard events into this folder (needs tensorboard)")
    allow_global_batch_change: bool = arg(False, "on --load, train on with a global batch other than the "
                                                 "checkpoint's (a different data stream and gradient noise)")
    save: str = arg("", "checkpoint folder")
    save_interval: int = arg(0, "save every this many steps (and at the end); 0: only at the end")
    keep_last: int = arg(0, "keep only the newest this many checkpoints; 0 keeps all")
    load: str = arg("", "resume from this checkpoint folder (a --save root or one step folder); "
                        "empty: resume from --save when it holds a checkpoint")
    max_skipped_steps: int = arg(5, "stop after this many consecutive steps with a non-finite loss or "
                                    "gradient norm (each is skipped, not applied)")
    device: str = arg("auto", "auto | cpu | cuda", choices=["auto", "cpu", "cuda"])
    dtype: str = arg("auto", "auto (bfloat16 on CUDA, float32 on the CPU) | float32 | bfloat16: bf16 weights and "
                             "activations, fp32 master weights and AdamW state | bfloat16-autocast: fp32 weights, "
                             "bf16 matmuls (the older, slower scheme)",
                     choices=["auto", "float32", "bfloat16", "bfloat16-autocast"])
    recompute: bool = arg(False, "activation checkpointing: recompute each block in backward (less memory)")
    compile: bool = arg(False, "torch.compile each block (CUDA; works on CPU too, slowly)")
    dist_timeout: float = arg(300.0, "seconds before a stuck collective fails the run")
    progress: bool = arg(True, "show a tqdm progress bar on rank 0")
    eval_only: bool = arg(False, "with --load: report validation loss, perplexity (and bits per byte) and exit")
    dry_run: bool = arg(False, "check the flags and layout of a launch of --world-size ranks and print each stage's "
                               "parameters and memory per rank, then exit: one process, no GPU, nothing allocated")
    world_size: int = arg(0, "with --dry-run: the ranks of the planned launch; 0: this launch's (1 without torchrun)")

    def validate(self) -> None:
        """Ranges and finiteness of every field; raise ConfigError naming the flag to change."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name in ("tensor_parallel_size", "pipeline_parallel_size", "num_microbatches", "micro_batch_size",
                     "max_steps", "log_interval", "eval_iters", "max_skipped_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("expert_parallel_size", "num_layers_per_virtual_stage", "lr_decay_steps", "eval_interval",
                     "save_interval", "keep_last", "world_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        # `not x >= 0` is also true for NaN, which argparse's float() accepts.
        for name in ("min_lr", "weight_decay", "grad_clip", "router_aux_loss_coef", "router_z_loss_coef",
                     "router_bias_update_rate", "mtp_loss_coef"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{flag(name)} must be finite and >= 0, got {getattr(self, name)}")
        if self.warmup_steps < -1:
            raise ConfigError(f"--warmup-steps must be >= 0 (or -1 for the default), got {self.warmup_steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be finite and > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
        if not 0 < self.lr_decay_fraction <= 1:  # also false for NaN
            raise ConfigError(f"--lr-decay-fraction must be in (0, 1], got {self.lr_decay_fraction}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.lr_schedule == "cosine" and any(getattr(self, n) != defaults[n] for n in WSD_FLAGS):
            raise ConfigError("--lr-decay-fraction and --lr-decay-style shape the decay of --lr-schedule wsd; "
                              "add --lr-schedule wsd (the cosine schedule decays from the end of the warm-up)")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be between 0 and 2^63 - 1, got {self.seed}")
        if not 1 <= self.dist_timeout <= 7 * 86400:  # also false for NaN
            raise ConfigError(f"--dist-timeout must be between 1 second and 7 days, got {self.dist_timeout}")
        if self.use_distributed_optimizer and self.optimizer == "muon":
            raise ConfigError("--use-distributed-optimizer shards AdamW's state by flat ranges of the weights, but "
                              "Muon's Newton-Schulz needs each matrix whole; use --optimizer adamw, or drop "
                              "--use-distributed-optimizer (on --load the checkpoint's optimizer counts)")
        if self.eval_only and not self.load:
            raise ConfigError("--eval-only needs a checkpoint: give --load DIR")
        if self.world_size and not self.dry_run:
            raise ConfigError("--world-size sizes a planned launch: give it with --dry-run (torchrun sets a real one)")
        if self.device == "cuda" and not self.dry_run and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu")

    def schedule(self) -> LRSchedule:
        return lr_schedule(self.lr, self.min_lr, self.warmup_steps, self.lr_decay_steps, self.max_steps,
                           self.lr_schedule, self.lr_decay_fraction, self.lr_decay_style)


MODEL_CHOICES = {"router_score_function": ["softmax", "sigmoid"],
                 "router_type": ["topk", "expert-choice", "round-robin"],
                 "router_aux_loss_type": ["micro-batch", "global-batch", "sequence"]}
MODEL_HELP = {
    "vocab_size": "vocabulary size (byte-level data: 256; token files: from meta.json)",
    "hidden_size": "model width D",
    "num_layers": "decoder blocks",
    "num_attention_heads": "query heads",
    "num_kv_heads": "key/value heads (grouped-query attention when fewer than query heads)",
    "head_dim": "width of each attention head; q/k/v/o are heads x head-dim wide, which need not be the hidden "
                "size (Qwen3-30B-A3B: hidden 2048, 32 heads of 128); 0 = hidden size / heads",
    "ffn_hidden_size": "hidden width of the dense SwiGLU MLP layers",
    "moe_ffn_hidden_size": "hidden width of each expert",
    "num_experts": "experts per MoE layer; 0 gives a dense model",
    "num_experts_per_token": "top-k: experts each token is sent to",
    "moe_layer_interval": "layer i is an MoE layer iff (i + 1) % interval == 0 (and i >= --first-k-dense-layers)",
    "first_k_dense_layers": "the first this many layers are dense whatever the interval (DeepSeek-V3: 3, Kimi-K2: 1)",
    "moe_layer_list": "comma-separated 0-based MoE layers, e.g. 1,3,5 (instead of the interval and first-k); "
                      "empty: the interval decides",
    "norm_topk_prob": "renormalise the top-k router weights to sum to 1",
    "num_shared_experts": "always-on shared experts per MoE layer (DeepSeekMoE)",
    "shared_expert_ffn_hidden_size": "width of each shared expert; 0 = --moe-ffn-hidden-size",
    "router_score_function": "softmax | sigmoid (sigmoid: top-k weights renormalised, as DeepSeek-V3)",
    "router_topk_scaling_factor": "multiply the top-k combine weights (after renormalisation) by this "
                                  "(DeepSeek-V3: 2.5, Kimi-K2: 2.827)",
    "router_num_groups": "group-limited routing: split the experts into this many contiguous groups; 1 = off",
    "router_group_topk": "groups each token keeps (a group scored by the sum of its two best expert scores) "
                         "before choosing its top-k among their experts",
    "router_type": "topk | expert-choice (each expert takes its best tokens; not causal) | "
                   "round-robin (forced balance, for benchmarks)",
    "router_aux_loss_type": "micro-batch | global-batch | sequence: where the balancing loss counts f_i",
    "moe_capacity_factor": "expert capacity = factor x tokens x top-k / experts; lowest-scored "
                           "assignments beyond it are dropped; 0 = dropless",
    "router_jitter_noise": "multiply router inputs by U(1-eps, 1+eps) in training (Switch); 0 = off",
    "seq_length": "tokens per training sequence",
    "rope_theta": "rotary embedding base",
    "rms_norm_eps": "RMSNorm epsilon",
    "init_std": "std of the normal initialisation",
    "mtp_num_layers": "multi-token prediction modules (DeepSeek-V3 MTP): module k predicts the token k + 1 ahead "
                      "through its own block and the shared embedding and LM head; training only, generation and "
                      "export ignore them; 0 = off",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its complaint on one `error:` line (it prints `prog: error:`), exit status 2."""

    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# --help shows the flags in these groups, in this order (README_MOE.md's tables follow them);
# every field of ModelConfig and TrainConfig is in exactly one.
FLAG_GROUPS = (
    ("model", ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
               "ffn_hidden_size", "seq_length", "rope_theta", "rms_norm_eps", "init_std")),
    ("MoE and routing", ("num_experts", "num_experts_per_token", "moe_layer_interval", "first_k_dense_layers",
                         "moe_layer_list", "moe_ffn_hidden_size", "num_shared_experts",
                         "shared_expert_ffn_hidden_size", "norm_topk_prob", "router_score_function",
                         "router_topk_scaling_factor", "router_num_groups", "router_group_topk", "router_type",
                         "router_aux_loss_type", "router_aux_loss_coef",
                         "router_z_loss_coef", "router_bias_update_rate", "moe_capacity_factor",
                         "router_jitter_noise")),
    ("multi-token prediction", ("mtp_num_layers", "mtp_loss_coef")),
    ("parallel layout", ("tensor_parallel_size", "sequence_parallel", "pipeline_parallel_size",
                         "num_layers_per_virtual_stage",
                         "expert_parallel_size", "num_microbatches", "dist_timeout", "dry_run", "world_size")),
    ("data", ("data", "seed", "micro_batch_size")),
    ("optimisation", ("max_steps", "optimizer", "lr", "min_lr", "warmup_steps", "lr_decay_steps", "lr_schedule",
                      "lr_decay_fraction", "lr_decay_style", "weight_decay", "grad_clip", "max_skipped_steps",
                      "use_distributed_optimizer")),
    ("device and precision", ("device", "dtype", "recompute", "compile")),
    ("checkpoints", ("save", "save_interval", "keep_last", "load", "allow_global_batch_change")),
    ("evaluation and logging", ("eval_interval", "eval_iters", "eval_only", "log_interval", "metrics_file",
                                "tensorboard", "progress")),
)


def build_arg_parser() -> argparse.ArgumentParser:
    """One flag per config field, named after it (`num_experts` -> `--num-experts`), in FLAG_GROUPS."""
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       usage="[torchrun --nproc_per_node=N] minimal_pretrain.py [flags]")
    fields = {f.name: (f, MODEL_HELP[f.name]) for f in dataclasses.fields(ModelConfig)}
    fields.update({f.name: (f, f.metadata["help"]) for f in dataclasses.fields(TrainConfig)})
    for title, names in FLAG_GROUPS:
        group = p.add_argument_group(title)
        for name in names:
            f, help_text = fields[name]
            flag, help_text = "--" + name.replace("_", "-"), help_text.replace("%", "%%")
            if field_kind(f) is bool:
                group.add_argument(flag, default=f.default, help=help_text, action=argparse.BooleanOptionalAction)
            else:
                choices = f.metadata.get("choices") if f.metadata else MODEL_CHOICES.get(name)
                group.add_argument(flag, default=f.default, type=field_kind(f), help=help_text, choices=choices)
    return p


def parse_config(argv: list[str] | None = None) -> tuple[ModelConfig, TrainConfig, set[str]]:
    """Flags -> (model config, train config, names of the flags given explicitly)."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    given = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    model = ModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)})
    train = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    return model, train, given


# Train flags that define which sequences a step sees: on --load they default to the checkpoint's.
DATA_STREAM_FLAGS = ("seed", "data", "micro_batch_size")
# Train flags that shape the learning rate: on --load they default to the checkpoint's too, so a
# resumed run goes on with the schedule it was following (a longer --max-steps alone keeps it).
SCHEDULE_FLAGS = ("lr", "min_lr", "warmup_steps", "lr_decay_steps", "lr_schedule", "lr_decay_fraction",
                  "lr_decay_style")
# The flags that shape only WSD's decay (the cosine schedule refuses values other than their defaults).
WSD_FLAGS = ("lr_decay_fraction", "lr_decay_style")


def checked_fields(cls: type, saved: dict, where: str) -> dict:
    """The entries of a saved config that are fields of `cls`, each of its field's type.

    Unknown names or wrong types mean the checkpoint was written by another trainer (or
    edited by hand): refused here, with the field named, not as a TypeError later."""
    kinds = {f.name: field_kind(f) for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - set(kinds))
    if unknown:
        raise ckpt_io.CheckpointError(f"{where}: unknown fields {unknown}; the checkpoint was written by "
                                      f"another trainer or version")
    for name, value in saved.items():
        kind = kinds[name]
        if kind is bool:
            ok = isinstance(value, bool)
        else:  # bool is an int to Python, not to a config; an int is a fine float
            ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not ok:
            raise ckpt_io.CheckpointError(f"{where}: {name} = {value!r} is not a {kind.__name__}; "
                                          f"the checkpoint is damaged")
    return saved


def model_config_from_checkpoint(saved: dict, mc: ModelConfig, given: set[str], where: str) -> ModelConfig:
    """The checkpoint's model config; a model flag given on the command line must agree with it."""
    saved = checked_fields(ModelConfig, saved, where)
    for name, value in saved.items():
        if name in given and getattr(mc, name) != value:
            raise ckpt_io.CheckpointError(f"--{name.replace('_', '-')} {getattr(mc, name)} conflicts with the "
                                          f"checkpoint's {value}; drop the flag (model flags come from the checkpoint)")
    return ModelConfig(**saved)


def saved_value(saved_train: dict, name: str, where: str) -> Any:
    """A saved train flag, type-checked; the default for a field the checkpoint predates."""
    if name not in saved_train:
        return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
    return checked_fields(TrainConfig, {name: saved_train[name]}, where)[name]


def flag_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def continue_saved_run(tc: TrainConfig, resume: ckpt_io.Checkpoint, given: set[str], world_size: int) -> list[str]:
    """Make the flags of a resumed run continue the saved one; return the notes to print at start.

    The data stream (seed, data, micro-batch size), the LR schedule and the optimizer default
    to the checkpoint's. The global batch must stay the checkpoint's: when --num-microbatches is not
    given it is derived to keep it; a change needs --allow-global-batch-change. A checkpoint
    with weights only (import_hf.py, upcycle.py) starts a fresh optimizer and schedule."""
    saved, where = resume.meta["train"], f"{resume.path}/meta.json"
    for name in DATA_STREAM_FLAGS:  # the batches of a resumed run continue the saved stream
        if name not in given and name in saved:
            setattr(tc, name, saved_value(saved, name, where))
    if not resume.optim:
        return [f"{resume.path} holds weights only (imported or upcycled): the optimizer state is fresh and the LR "
                f"schedule starts at step 0 with its warm-up"]
    if tc.eval_only:
        return []
    step, notes = resume.meta["step"], []

    # ---- the optimizer
    old_optimizer = saved_value(saved, "optimizer", where)  # "adamw" for checkpoints from before Muon
    if "optimizer" not in given:
        tc.optimizer = old_optimizer
    elif tc.optimizer != old_optimizer:
        notes.append(f"the checkpoint was trained with {old_optimizer}, this run uses --optimizer {tc.optimizer}: the "
                     f"hidden matrices' optimizer state starts fresh (AdamW's moments <-> Muon's momentum); the "
                     f"embedding, LM head, norm and router moments go on")

    # ---- the learning-rate schedule
    old = {name: saved_value(saved, name, where) for name in SCHEDULE_FLAGS + ("max_steps",)}
    old_schedule = lr_schedule(old["lr"], old["min_lr"], old["warmup_steps"], old["lr_decay_steps"],
                               max(1, old["max_steps"]), old["lr_schedule"], old["lr_decay_fraction"],
                               old["lr_decay_style"])
    kept = dict(old, warmup_steps=old_schedule.warmup_steps, lr_decay_steps=old_schedule.decay_steps)
    for name in SCHEDULE_FLAGS:  # lr_schedule comes before the WSD flags, which a cosine schedule leaves alone
        if name not in given and not (name in WSD_FLAGS and tc.lr_schedule == "cosine"):
            setattr(tc, name, kept[name])
    new_schedule = tc.schedule()
    if new_schedule != old_schedule:
        changed = ", ".join(f"--{n.replace('_', '-')} {flag_text(kept[n])} -> {flag_text(getattr(tc, n))}"
                            for n in SCHEDULE_FLAGS if getattr(tc, n) != kept[n] and n in given)
        notes.append(f"the LR schedule changes at step {step} ({changed}): the LR goes from "
                     f"{old_schedule.at(step):.2e} to {new_schedule.at(step):.2e}")
    elif tc.max_steps > new_schedule.decay_steps:
        longer = lr_schedule(tc.lr, tc.min_lr, new_schedule.warmup_steps, tc.max_steps, tc.max_steps,
                             tc.lr_schedule, tc.lr_decay_fraction, tc.lr_decay_style)
        notes.append(f"the checkpoint's LR schedule goes on: its decay ends at step {new_schedule.decay_steps}, so "
                     f"steps {max(step, new_schedule.decay_steps)}-{tc.max_steps} train at --min-lr "
                     f"{tc.min_lr:.2e}; to decay over the longer run give --lr-decay-steps {tc.max_steps} "
                     f"(the LR at step {step} then goes from {old_schedule.at(step):.2e} to {longer.at(step):.2e})")

    # ---- the global batch (sequences per step)
    layout = resume.meta["layout"]
    old_batch = (saved_value(saved, "micro_batch_size", where) * saved_value(saved, "num_microbatches", where)
                 * layout["dp"])
    dp = max(1, world_size // max(1, tc.tensor_parallel_size * tc.pipeline_parallel_size))
    per_micro = tc.micro_batch_size * dp
    if "num_microbatches" not in given and old_batch % per_micro == 0 and old_batch // per_micro != tc.num_microbatches:
        tc.num_microbatches = old_batch // per_micro
        notes.append(f"--num-microbatches {tc.num_microbatches} keeps the checkpoint's global batch of {old_batch} "
                     f"sequences on DP {dp}")
    new_batch = per_micro * tc.num_microbatches
    if new_batch != old_batch:
        if not tc.allow_global_batch_change:
            fix = (f"--num-microbatches {old_batch // per_micro}" if old_batch % per_micro == 0 else
                   f"a layout whose DP x --micro-batch-size divides {old_batch}")
            raise ConfigError(f"the checkpoint was trained with a global batch of {old_batch} sequences, this run's is "
                              f"{new_batch} (--micro-batch-size {tc.micro_batch_size} x --num-microbatches "
                              f"{tc.num_microbatches} x DP {dp}), which changes the data stream and gradient noise; "
                              f"use {fix}, or --allow-global-batch-change to train on with it")
        notes.append(f"the global batch changes from {old_batch} to {new_batch} sequences "
                     f"(--allow-global-batch-change): steps after {step} see another data stream")
    return notes


def validate(mc: ModelConfig, tc: TrainConfig, world_size: int) -> None:
    """The model's own checks, then the layout's: flags that fit each other and the world size
    (TrainConfig.validate has checked each train flag on its own first). Needs no communication."""
    try:
        mc.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tp, pp = tc.tensor_parallel_size, tc.pipeline_parallel_size
    ep = tc.expert_parallel_size or tp
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-parallel-size {tp} x "
                          f"--pipeline-parallel-size {pp}; launch a multiple of {tp * pp} ranks")
    dp = world_size // (tp * pp)
    if mc.num_attention_heads % tp or mc.num_kv_heads % tp:
        raise ConfigError(f"--tensor-parallel-size {tp} must divide --num-attention-heads "
                          f"({mc.num_attention_heads}) and --num-kv-heads ({mc.num_kv_heads})")
    if mc.vocab_size % tp:
        raise ConfigError(f"--tensor-parallel-size {tp} must divide the vocabulary ({mc.vocab_size})")
    if mc.ffn_hidden_size % tp:
        raise ConfigError(f"--tensor-parallel-size {tp} must divide --ffn-hidden-size ({mc.ffn_hidden_size})")
    if mc.shared_ffn_hidden_size % tp:
        raise ConfigError(f"--tensor-parallel-size {tp} must divide the shared experts' width "
                          f"(--num-shared-experts x size = {mc.shared_ffn_hidden_size})")
    if tc.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel splits the sequence over the TP ranks: it needs "
                          "--tensor-parallel-size > 1 (or drop --sequence-parallel)")
    if tc.sequence_parallel and mc.seq_length % tp:
        raise ConfigError(f"--sequence-parallel: --tensor-parallel-size {tp} must divide --seq-length "
                          f"({mc.seq_length}) so each TP rank holds an equal slice of every sequence")
    if mc.num_experts > 0:
        if mc.num_experts % ep:
            raise ConfigError(f"--expert-parallel-size {ep} must divide --num-experts ({mc.num_experts})")
        if (dp * tp) % ep:
            raise ConfigError(f"--expert-parallel-size {ep} must divide the ranks of a pipeline stage "
                              f"(DP {dp} x TP {tp} = {dp * tp})")
        if (tc.micro_batch_size * mc.seq_length) % tp:
            raise ConfigError(f"--tensor-parallel-size {tp} must divide the tokens of a micro-batch "
                              f"({tc.micro_batch_size} x {mc.seq_length}) so each TP rank routes a slice")
    elif tc.expert_parallel_size > 1:
        raise ConfigError("--expert-parallel-size > 1 needs --num-experts > 0")
    if mc.num_layers < pp:
        raise ConfigError(f"--num-layers ({mc.num_layers}) must be >= --pipeline-parallel-size ({pp})")
    if tc.num_microbatches < pp:
        raise ConfigError(f"--num-microbatches ({tc.num_microbatches}) must be >= --pipeline-parallel-size "
                          f"({pp}) or stages sit idle; use {pp} or more")
    per_chunk = tc.num_layers_per_virtual_stage
    if per_chunk:  # Megatron-LM's rules for virtual pipeline stages
        if pp == 1:
            raise ConfigError("--num-layers-per-virtual-stage splits each pipeline stage into chunks: it needs "
                              "--pipeline-parallel-size > 1")
        if mc.num_layers % (pp * per_chunk):
            raise ConfigError(f"--num-layers-per-virtual-stage {per_chunk} x --pipeline-parallel-size {pp} must "
                              f"divide --num-layers ({mc.num_layers}) so every rank holds equal chunks")
        if mc.num_layers // (pp * per_chunk) > 1 and tc.num_microbatches % pp:
            raise ConfigError(f"the interleaved schedule runs micro-batches in groups of --pipeline-parallel-size: "
                              f"--num-microbatches ({tc.num_microbatches}) must be a multiple of {pp}")


# ============================================================ distributed setup
@dataclass
class ParallelGroups:
    """Ranks, sizes and process groups of this rank. Global rank = (pp * DP + dp) * TP + tp."""

    rank: int
    world_size: int
    tp: int
    dp: int
    pp: int
    ep: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    ep_rank: int
    tp_group: Any = None
    dp_group: Any = None
    ep_group: Any = None
    expert_dp_group: Any = None  # ranks of this stage holding the same experts
    expert_dp_size: int = 1
    expert_dp_rank: int = 0  # this rank's place in expert_dp_group
    prev_rank: int | None = None  # same (dp, tp) on the previous pipeline stage
    next_rank: int | None = None
    embedding_group: Any = None  # MTP under PP: this (dp, tp)'s first- and last-stage ranks, which hold the embedding

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_process_group(backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
    """The default group, with store keys scoped to this torchrun restart.

    torchrun --max-restarts keeps its key-value store across restarts; without the prefix the
    restarted workers would read the previous workers' (dead) connection addresses."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)


def build_process_groups(tp: int, pp: int, ep: int, rank: int, world_size: int,
                         embedding_groups: bool = False) -> ParallelGroups:
    """Create every process group once (all ranks call new_group for every group, in order).

    Worked example, 8 ranks, TP2 x DP2 x PP2, EP2 (rank = (pp*2 + dp)*2 + tp):
        TP groups  [0,1] [2,3] [4,5] [6,7]      heads / FFN columns / vocab split
        DP groups  [0,2] [1,3] [4,6] [5,7]      dense gradients averaged
        PP groups  [0,4] [1,5] [2,6] [3,7]      activations flow 0->4, 1->5, ...
        EP groups  [0,1] [2,3] [4,5] [6,7]      consecutive ranks of a stage split the experts
        expert-DP  [0,2] [1,3] [4,6] [5,7]      ranks with the same experts sum expert gradients
    With EP4 on the same layout the EP groups become [0,1,2,3] [4,5,6,7] and every rank of a stage
    holds different experts (expert-DP groups of one rank).
    With `embedding_groups` (MTP under PP) also: embedding [0,4] [1,5] [2,6] [3,7], the first and last
    stage's ranks of each (dp, tp), which sum the gradients of their two embedding copies (Megatron's
    embedding group); with PP 2 they are the PP groups."""
    dp = world_size // (tp * pp)
    stage_size = dp * tp
    pp_rank, in_stage = divmod(rank, stage_size)
    dp_rank, tp_rank = divmod(in_stage, tp)
    g = ParallelGroups(rank=rank, world_size=world_size, tp=tp, dp=dp, pp=pp, ep=ep, tp_rank=tp_rank,
                       dp_rank=dp_rank, pp_rank=pp_rank, ep_rank=in_stage % ep,
                       expert_dp_size=stage_size // ep, expert_dp_rank=in_stage // ep)
    if pp_rank > 0:
        g.prev_rank = rank - stage_size
    if pp_rank < pp - 1:
        g.next_rank = rank + stage_size
    if world_size == 1:
        return g
    for p in range(pp):
        base = p * stage_size
        for d in range(dp):
            ranks = [base + d * tp + t for t in range(tp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                g.tp_group = group
        for t in range(tp):
            ranks = [base + d * tp + t for d in range(dp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                g.dp_group = group
        for start in range(0, stage_size, ep):
            ranks = [base + start + i for i in range(ep)]
            group = dist.new_group(ranks)
            if rank in ranks:
                g.ep_group = group
        for e in range(ep):
            ranks = [base + e + j * ep for j in range(stage_size // ep)]
            group = dist.new_group(ranks)
            if rank in ranks:
                g.expert_dp_group = group
    if embedding_groups and pp > 1:
        for in_stage in range(stage_size):
            ranks = [in_stage, (pp - 1) * stage_size + in_stage]
            group = dist.new_group(ranks)
            if rank in ranks:
                g.embedding_group = group
    return g


def model_parallel_for(pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig) -> ModelParallel:
    chunks = chunk_layers(mc.num_layers, pg.pp, pg.pp_rank, tc.num_layers_per_virtual_stage)
    return ModelParallel(tp_group=pg.tp_group, tp_rank=pg.tp_rank, tp_size=pg.tp,
                         ep_group=pg.ep_group, ep_rank=pg.ep_rank, ep_size=pg.ep,
                         first_stage=pg.first_stage, last_stage=pg.last_stage, chunks=tuple(chunks),
                         sequence_parallel=tc.sequence_parallel)


def describe_layout(pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig) -> str:
    """One line per rank: its stage, layers (each chunk's under interleaving), TP slice and experts
    (printed once by rank 0)."""
    sp = (f" with sequence parallelism ({mc.seq_length // pg.tp} of {mc.seq_length} positions per TP rank "
          f"between layers)" if tc.sequence_parallel else "")
    lines = [f"layout: world {pg.world_size} = PP {pg.pp} x DP {pg.dp} x TP {pg.tp}{sp}, EP {pg.ep}"]
    if tc.num_layers_per_virtual_stage and pg.pp > 1:
        v = mc.num_layers // (pg.pp * tc.num_layers_per_virtual_stage)
        lines[0] += f" | interleaved 1F1B: {v} chunks of {tc.num_layers_per_virtual_stage} layer(s) per rank"
    e_local = mc.num_experts // pg.ep if mc.num_experts else 0
    for r in range(pg.world_size):
        p, in_stage = divmod(r, pg.dp * pg.tp)
        d, t = divmod(in_stage, pg.tp)
        chunks = chunk_layers(mc.num_layers, pg.pp, p, tc.num_layers_per_virtual_stage)
        e = in_stage % pg.ep
        experts = f"experts {e * e_local}-{(e + 1) * e_local - 1}" if e_local else "dense"
        lines.append(f"  rank {r}: stage {p} {layers_text(chunks)} | dp {d} | tp {t}/{pg.tp} | {experts}")
    return "\n".join(lines)


# ========================================================================= data
def local_microbatches(x: torch.Tensor, y: torch.Tensor, pg: ParallelGroups, tc: TrainConfig,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DP rank d takes the d-th contiguous slice of the global batch, cut into micro-batches."""
    per_rank = tc.micro_batch_size * tc.num_microbatches
    x = x[pg.dp_rank * per_rank:(pg.dp_rank + 1) * per_rank].to(device)
    y = y[pg.dp_rank * per_rank:(pg.dp_rank + 1) * per_rank].to(device)
    return list(zip(x.split(tc.micro_batch_size), y.split(tc.micro_batch_size)))


# ===================================================== pipeline schedule (1F1B)
def p2p(pg: ParallelGroups, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
        recv_prev: bool = False, recv_next: bool = False, shape: tuple[int, ...] = (),
        device: torch.device | None = None, dtype: torch.dtype = torch.float32,
        ring: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Exchange activations / gradients with neighbouring stages in one batch (no deadlock).

    ring: the last stage's next is the first stage and the first's previous the last (the
    interleaved schedule's chunk boundary). With PP 2 both neighbours are one rank: the sends
    to it (next, then previous) and its receives (previous, then next) then pair up in order."""
    next_rank, prev_rank = pg.next_rank, pg.prev_rank
    if ring:
        stage_size = pg.world_size // pg.pp
        next_rank, prev_rank = (pg.rank + stage_size) % pg.world_size, (pg.rank - stage_size) % pg.world_size
    ops, from_prev, from_next = [], None, None
    if send_next is not None and next_rank is not None:
        ops.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), next_rank))
    if send_prev is not None and prev_rank is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), prev_rank))
    if recv_prev and prev_rank is not None:
        from_prev = torch.empty(shape, device=device, dtype=dtype)
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank))
    if recv_next and next_rank is not None:
        from_next = torch.empty(shape, device=device, dtype=dtype)
        ops.append(dist.P2POp(dist.irecv, from_next, next_rank))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return from_prev, from_next


@dataclass
class PipelineTimer:
    """Seconds one rank spent in run_microbatches and, of those, waiting in p2p; and the CPU
    seconds of each forward and backward step (given only by scripts/bench_pipeline.py: the
    trainer passes none and pays nothing)."""

    total: float = 0.0
    wait: float = 0.0
    steps: list[tuple[str, int, int, float]] = field(default_factory=list)  # (kind, chunk, micro, CPU s)


@dataclass
class StepStats:
    """Sums over this rank's micro-batches, later summed over all ranks."""

    lm_loss: float = 0.0  # sum of micro-batch mean LM losses (last stage, TP rank 0 only)
    mtp_loss: float = 0.0  # sum of micro-batch MTP losses, mean_k CE_k (last stage, TP rank 0 only)
    aux_loss: torch.Tensor | None = None  # sum over micro-batches and this stage's MoE layers
    z_loss: torch.Tensor | None = None
    counts: torch.Tensor | None = None  # (num MoE layers, E) rows each expert computed
    routed: torch.Tensor | None = None  # (num MoE layers, E) the routers' top-k choices
    dropped: torch.Tensor | None = None  # (num MoE layers,) assignments over capacity


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    """Multi-token prediction loss (DeepSeek-V3, eq. 24-25): the mean over the D modules of CE_k, module k's
    mean cross-entropy over the positions i < T - k whose target t_{i+k+1} = targets[:, i + k] exists.
    mtp_logits[k - 1] (B, T - k, V_local); targets (B, T). Zero without MTP modules (or off the last stage)."""
    if not mtp_logits:
        return torch.zeros((), device=targets.device)
    losses = [vocab_parallel_cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten(), par)
              for k, logits in enumerate(mtp_logits, start=1)]
    return torch.stack(losses).mean()


def run_microbatches(model: MoETransformer, micro: list[tuple[torch.Tensor, torch.Tensor]],
                     pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig, device: torch.device,
                     autocast_dtype: torch.dtype | None, train: bool, step: int | None = None,
                     reducers: list[OverlappedGradReduce] = (), timer: PipelineTimer | None = None) -> StepStats:
    """Forward (and backward when `train`) of this rank's micro-batches, pipelined over stages.

    1F1B (PipeDream-Flush, Narayanan et al. 2021): stage s runs PP-s-1 warm-up forwards, then
    alternates one forward and one backward, then drains the remaining backwards, so at most
    PP micro-batches of activations are alive. With PP = 1 it is plain gradient accumulation.
    A rank holding several model chunks runs the interleaved schedule (run_interleaved).

    Each micro-batch's loss is scaled by 1/M so the gradients are those of the mean over the
    M micro-batches; the aux and z losses of every stage join that stage's backward.
    `step` seeds the router jitter of each micro-batch by its index in the global batch.
    The `reducers` are armed before the last backward, so gradient all-reduces overlap it."""
    n_moe = len(mc.all_moe_layers)
    moe_row = {layer: i for i, layer in enumerate(mc.all_moe_layers)}
    m = len(micro)
    b, t = micro[0][0].shape
    # Under sequence parallelism each TP rank sends and receives only its slice of the sequence.
    shape = (b, t // pg.tp if model.par.sequence_parallel else t, mc.hidden_size)
    # Activations and their gradients cross stages in the weights' dtype (bf16 with bf16 weights).
    act_dtype = next(iter(model.layers.values())).input_layernorm.weight.dtype
    width = max(mc.num_experts, 1)
    stats = StepStats(aux_loss=torch.zeros((), device=device), z_loss=torch.zeros((), device=device),
                      counts=torch.zeros(n_moe, width, device=device), routed=torch.zeros(n_moe, width, device=device),
                      dropped=torch.zeros(n_moe, device=device))
    last_chunk = len(model.chunks) - 1
    # (chunk, micro-batch) -> its (input, output, loss), kept from its forward for its backward
    saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}

    def forward_step(i: int, inp: torch.Tensor | None, chunk: int = 0) -> torch.Tensor:
        x, y = micro[i]
        noise_seed = None  # passed only when used: torch.compile would recompile for every new int value
        if step is not None and mc.router_jitter_noise > 0:
            noise_seed = (tc.seed * 1_000_003 + step) * 65_537 + pg.dp_rank * m + i
        # Training steps (`step` given) also run the MTP modules; evaluation measures the LM loss only.
        mtp_targets = y if pg.last_stage and chunk == last_chunk and mc.mtp_num_layers and step is not None else None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x if pg.first_stage and chunk == 0 else inp, noise_seed=noise_seed, chunk=chunk,
                        mtp_targets=mtp_targets)
        router_loss = torch.zeros((), device=device)
        if n_moe:
            # Means over all MoE layers of the model: each stage adds its layers' share.
            router_loss = (tc.router_aux_loss_coef * out.aux_loss + tc.router_z_loss_coef * out.z_loss) / n_moe
            stats.aux_loss += out.aux_loss.detach()
            stats.z_loss += out.z_loss.detach()
            for layer, s in out.stats.items():
                stats.counts[moe_row[layer]] += s.counts.float()
                stats.routed[moe_row[layer]] += s.routed.float()
                stats.dropped[moe_row[layer]] += s.dropped.float()
        if pg.last_stage and chunk == last_chunk:
            lm = vocab_parallel_cross_entropy(out.output.flatten(0, 1), y.flatten(), model.par)
            mtp = mtp_loss(out.mtp_logits, y, model.par)
            if pg.tp_rank == 0:
                stats.lm_loss += lm.item()
                stats.mtp_loss += mtp.item()
            loss = (lm + tc.mtp_loss_coef * mtp + router_loss) / m
        else:
            loss = router_loss / m
        if train:
            saved[chunk, i] = (inp, out.output, loss)
        return out.output

    backwards_done = [0]

    def backward_step(i: int, grad_out: torch.Tensor | None, chunk: int = 0) -> torch.Tensor | None:
        inp, out, loss = saved.pop((chunk, i))
        backwards_done[0] += 1
        # The last backward completes every gradient of the step. Under interleaving it is chunk 0's:
        # the other chunks' buckets, finished earlier, start in finish() instead of overlapping it.
        if backwards_done[0] == m * (last_chunk + 1):
            for reducer in reducers:
                reducer.arm()
        if pg.last_stage and chunk == last_chunk:
            loss.backward()
        else:
            tensors, grads = [out], [grad_out]
            if loss.requires_grad:  # this stage's aux and z losses
                tensors.append(loss)
                grads.append(torch.ones_like(loss))
            torch.autograd.backward(tensors, grads)
        return inp.grad if inp is not None else None

    def timed(kind: str, run_step: Callable[..., Any]) -> Callable[..., Any]:
        def run(i: int, x: torch.Tensor | None, chunk: int = 0) -> Any:
            start = time.thread_time()  # this thread's CPU time: not inflated by waiting for a core
            result = run_step(i, x, chunk)
            timer.steps.append((kind, chunk, i, time.thread_time() - start))
            return result
        return run

    if timer is not None:
        forward_step, backward_step = timed("F", forward_step), timed("B", backward_step)

    def exchange(**kw: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        start = time.perf_counter()
        received = p2p(pg, shape=shape, device=device, dtype=act_dtype, **kw)
        if timer is not None:
            timer.wait += time.perf_counter() - start
        return received

    def recv_forward() -> torch.Tensor | None:
        if pg.first_stage:
            return None
        inp, _ = exchange(recv_prev=True)
        return inp.requires_grad_(train)

    started = time.perf_counter()
    if len(model.chunks) > 1:
        with torch.set_grad_enabled(train):
            run_interleaved(pg, len(model.chunks), m, train, forward_step, backward_step, exchange)
    elif not train:
        with torch.no_grad():
            for i in range(m):
                out = forward_step(i, recv_forward())
                exchange(send_next=None if pg.last_stage else out)
    else:
        warmup = min(pg.pp - pg.pp_rank - 1, m)
        for i in range(warmup):
            out = forward_step(i, recv_forward())
            exchange(send_next=None if pg.last_stage else out)
        inp = recv_forward() if warmup < m else None
        for i in range(warmup, m):
            out = forward_step(i, inp)
            _, grad_out = exchange(send_next=None if pg.last_stage else out, recv_next=True)
            in_grad = backward_step(i - warmup, grad_out)
            if i == m - 1:
                exchange(send_prev=in_grad)
            else:  # send this gradient back while receiving the next micro-batch's input
                inp, _ = exchange(send_prev=in_grad, recv_prev=True)
                if inp is not None:
                    inp.requires_grad_(True)
        for i in range(m - warmup, m):
            _, grad_out = exchange(recv_next=True)
            exchange(send_prev=backward_step(i, grad_out))
    if timer is not None:
        timer.total += time.perf_counter() - started
    return stats


# ============================================ interleaved 1F1B (virtual pipeline stages)
class PipeStep(NamedTuple):
    """One step of a pipeline rank: the forward ("F") or backward ("B") of one model chunk on one micro-batch."""

    kind: str
    chunk: int
    micro: int


def interleaved_ticks(pp: int, rank: int, chunks: int, num_micro: int, train: bool = True) -> list[list[PipeStep]]:
    """The interleaved 1F1B schedule of pipeline rank `rank` (Narayanan et al. 2021, sec. 2.2, in the
    order of Megatron-LM's forward_backward_pipelining_with_interleaving), as ticks: [F] in the
    warm-up, [F, B] in the steady state (forward first), [B] in the cool-down.

    The k-th forward runs chunk (k mod PP*V) // PP on micro-batch (k // (PP*V)) * PP + k mod PP:
    a group of PP micro-batches goes through chunk 0, then the same group through chunk 1, ...,
    so a rank works on its next chunk while the group travels round the other ranks. The k-th
    backward takes the chunks in reverse order. Warm-up: (PP - rank - 1) * 2 + (V - 1) * PP
    forwards, or all of them when M == PP (and without training)."""
    total = num_micro * chunks

    def nth(k: int, kind: str) -> PipeStep:
        group, in_group = divmod(k, pp * chunks)
        chunk = in_group // pp
        return PipeStep(kind, chunk if kind == "F" else chunks - 1 - chunk, group * pp + k % pp)

    if not train:
        return [[nth(k, "F")] for k in range(total)]
    warmup = total if num_micro == pp else min(total, (pp - rank - 1) * 2 + (chunks - 1) * pp)
    return ([[nth(k, "F")] for k in range(warmup)]
            + [[nth(warmup + k, "F"), nth(k, "B")] for k in range(total - warmup)]
            + [[nth(k, "B")] for k in range(total - warmup, total)])


def step_target(pp: int, chunks: int, rank: int, step: PipeStep) -> int | None:
    """The rank that needs what `step` produces, or None: a forward's output goes to the next
    rank's same chunk (the last rank's to rank 0's next chunk), an input gradient the opposite way."""
    if step.kind == "F":
        return rank + 1 if rank < pp - 1 else (0 if step.chunk < chunks - 1 else None)
    return rank - 1 if rank > 0 else (pp - 1 if step.chunk > 0 else None)


def step_source(pp: int, chunks: int, rank: int, step: PipeStep) -> tuple[int, PipeStep] | None:
    """The (rank, step) whose output `step` takes as its input (activation or output gradient), or
    None for the first chunk's forward on rank 0 (token ids) and the last chunk's backward on the
    last rank (the loss)."""
    if step.kind == "F":
        if rank > 0:
            return rank - 1, step
        return (pp - 1, step._replace(chunk=step.chunk - 1)) if step.chunk > 0 else None
    if rank < pp - 1:
        return rank + 1, step
    return (0, step._replace(chunk=step.chunk + 1)) if step.chunk < chunks - 1 else None


def interleaved_slots(pp: int, chunks: int, num_micro: int, train: bool = True) -> list[list[int]]:
    """slots[rank][t]: the slot in which `rank` runs its tick t; computed alike on every rank.

    All ranks go through the slots together: in a slot a rank runs at most one tick, then sends
    what it produced to its ring neighbours, who post the matching receives in that same slot
    (they know the sender's slots too). So every batched exchange is matched within its slot and
    no rank can wait for one that comes later: no deadlock, with gloo or NCCL. A tick takes the
    first slot after the ticks that produce its inputs."""
    ticks = [interleaved_ticks(pp, r, chunks, num_micro, train) for r in range(pp)]
    made: set[tuple[int, PipeStep] | None] = {None}  # (rank, step) already run; None: the inputs a rank has itself
    slots: list[list[int]] = [[] for _ in range(pp)]
    slot = 0
    while any(len(slots[r]) < len(ticks[r]) for r in range(pp)):
        ran = []
        for r in range(pp):
            t = len(slots[r])
            if t < len(ticks[r]) and all(step_source(pp, chunks, r, st) in made for st in ticks[r][t]):
                slots[r].append(slot)
                ran += [(r, st) for st in ticks[r][t]]
        if not ran:
            raise RuntimeError(f"interleaved schedule stalls at slot {slot} (PP {pp}, {chunks} chunks, "
                               f"{num_micro} micro-batches)")
        made.update(ran)  # after the slot: what a slot produces is received at its end
        slot += 1
    return slots


def run_interleaved(pg: ParallelGroups, chunks: int, num_micro: int, train: bool,
                    forward_step: Callable[..., torch.Tensor], backward_step: Callable[..., torch.Tensor | None],
                    exchange: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
    """Run this rank's interleaved 1F1B ticks slot by slot (interleaved_slots), the received
    activations and gradients kept by (chunk, micro-batch) until their step runs."""
    pp, rank = pg.pp, pg.pp_rank
    ticks = [interleaved_ticks(pp, r, chunks, num_micro, train) for r in range(pp)]
    slots = interleaved_slots(pp, chunks, num_micro, train)
    tick_at = [dict(zip(slots[r], ticks[r])) for r in range(pp)]  # rank -> {slot: tick}
    prev, nxt = (rank - 1) % pp, (rank + 1) % pp
    inputs: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, micro) -> activation from the previous rank
    grads: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, micro) -> output gradient from the next rank
    for slot in range(max(s[-1] for s in slots) + 1):
        send_next = send_prev = None
        for st in tick_at[rank].get(slot, []):
            if st.kind == "F":
                inp = inputs.pop((st.chunk, st.micro)) if step_source(pp, chunks, rank, st) else None
                out = forward_step(st.micro, inp, st.chunk)
                send_next = out if step_target(pp, chunks, rank, st) is not None else None
            else:
                grad = grads.pop((st.chunk, st.micro)) if step_source(pp, chunks, rank, st) else None
                in_grad = backward_step(st.micro, grad, st.chunk)
                send_prev = in_grad if step_target(pp, chunks, rank, st) is not None else None
        # What the neighbours produced for this rank in this slot (at most one forward, one backward each).
        fwd_in = [st for st in tick_at[prev].get(slot, [])
                  if st.kind == "F" and step_target(pp, chunks, prev, st) == rank]
        bwd_in = [st for st in tick_at[nxt].get(slot, [])
                  if st.kind == "B" and step_target(pp, chunks, nxt, st) == rank]
        if send_next is None and send_prev is None and not fwd_in and not bwd_in:
            continue
        from_prev, from_next = exchange(send_next=send_next, send_prev=send_prev, recv_prev=bool(fwd_in),
                                        recv_next=bool(bwd_in), ring=True)
        for st in fwd_in:  # the previous rank's chunk v is this rank's chunk v (rank 0: v + 1)
            inputs[st.chunk + (rank == 0), st.micro] = from_prev.requires_grad_(train)
        for st in bwd_in:  # the next rank's chunk v is this rank's chunk v (last rank: v - 1)
            grads[st.chunk - (rank == pp - 1), st.micro] = from_next
def reduce_step_stats(stats: StepStats, pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig,
                      steps: int = 1) -> dict:
    """Global-batch means of the losses and per-expert load fractions (same on every rank);
    `stats` may sum several steps (a log interval): the means are then over those steps."""
    n_moe = len(mc.all_moe_layers)
    packed = torch.cat([torch.tensor([stats.lm_loss, stats.mtp_loss], device=stats.counts.device),
                        stats.aux_loss.reshape(1), stats.z_loss.reshape(1), stats.dropped,
                        stats.counts.flatten()]).double()
    if pg.world_size > 1:
        # lm: last stage, TP rank 0; aux / z: TP ranks hold shares, stages hold layers; counts likewise
        dist.all_reduce(packed, group=None)
    num_micro = tc.num_microbatches * pg.dp * steps
    lm, mtp = packed[0].item() / num_micro, packed[1].item() / num_micro
    aux = packed[2].item() / (num_micro * n_moe) if n_moe else 0.0
    z = packed[3].item() / (num_micro * n_moe) if n_moe else 0.0
    dropped = packed[4:4 + n_moe]
    counts = packed[4 + n_moe:].view(n_moe, max(mc.num_experts, 1))
    load = {str(layer): (counts[i] / counts[i].sum()).tolist() for i, layer in enumerate(mc.all_moe_layers)}
    result = {"loss": lm + tc.mtp_loss_coef * mtp + tc.router_aux_loss_coef * aux + tc.router_z_loss_coef * z,
              "lm_loss": lm, "aux_loss": aux, "z_loss": z, "expert_load": load}
    if mc.mtp_num_layers:
        result["mtp_loss"] = mtp
    health = {str(layer): load_health(counts[i].tolist(), pg.ep, pg.expert_dp_size, steps)
              for i, layer in enumerate(mc.all_moe_layers)}
    for name in HEALTH_FIELDS:  # {field: {layer: value}}
        if health and name in next(iter(health.values())):
            result[name] = {layer: h[name] for layer, h in health.items()}
    if mc.moe_capacity_factor > 0 and mc.router_type == "topk":
        result["dropped_fraction"] = {str(layer): (dropped[i] / (dropped[i] + counts[i].sum())).item()
                                      for i, layer in enumerate(mc.all_moe_layers)}
    return result


def global_expert_counts(stats: StepStats, pg: ParallelGroups, routed: bool) -> torch.Tensor:
    """(num MoE layers, E) router choices (or computed rows) of the whole global batch, on every rank."""
    counts = (stats.routed if routed else stats.counts).clone()
    if pg.world_size > 1:
        dist.all_reduce(counts, group=None)  # TP ranks hold slices, DP ranks batches, stages layers
    return counts


def set_global_batch_counts(model: MoETransformer, mc: ModelConfig, counts: torch.Tensor) -> None:
    """Give every MoE layer of this stage the f_i of the global batch (global-batch balancing)."""
    for layer, moe in model.moe_layers().items():
        moe.global_counts = counts[mc.all_moe_layers.index(layer)]


def update_expert_bias(model: MoETransformer, mc: ModelConfig, counts: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024): after the step, raise the routing bias
    of under-loaded experts and lower it for over-loaded ones by a fixed amount.

    counts (num MoE layers, E): rows each expert computed in the whole global batch. The bias
    only enters the top-k choice, never the weights, so it needs no gradient."""
    for layer, moe in model.moe_layers().items():
        load = counts[mc.all_moe_layers.index(layer)]
        moe.router.expert_bias += rate * torch.sign(load.mean() - load)


# ======================================================== gradients and optimizer
def bucketed_all_reduce(tensors: list[torch.Tensor], group: Any, bucket_bytes: int = 32 << 20) -> None:
    """Sum tensors over `group` in a few large flat buffers instead of one call per tensor."""
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()

    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()


class OverlappedGradReduce:
    """Sums gradients over `group` in buckets while the backward pass is still running, then scales.

    Buckets hold parameters in reverse order (the order backward finishes them). `arm()` is
    called before the last micro-batch's backward (earlier ones only accumulate); from then on
    each parameter's post-accumulate hook counts it ready, and a full bucket's all-reduce starts
    at once (async), overlapping the backward of the layers below. `finish()` starts what is
    left, waits, and copies the sums back. The result is the same as reducing after backward."""

    def __init__(self, params: list[torch.nn.Parameter], group: Any, size: int, scale: float,
                 bucket_bytes: int = 32 << 20):
        self.group, self.size, self.scale = group, size, scale
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        filled = 0
        for p in reversed(params):
            if filled >= bucket_bytes:
                self.buckets.append([])
                filled = 0
            self.buckets[-1].append(p)
            filled += p.numel() * p.element_size()
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.armed = False
        self.ready: list[int] = []
        self.work: dict[int, tuple[torch.Tensor, Any]] = {}
        for p in params:
            p.register_post_accumulate_grad_hook(self.on_grad_ready)

    def arm(self) -> None:
        self.armed, self.ready, self.work = True, [0] * len(self.buckets), {}

    def on_grad_ready(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        b = self.bucket_of[p]
        self.ready[b] += 1
        if self.ready[b] == len(self.buckets[b]):
            self.launch(b)

    def launch(self, b: int) -> None:
        grads = [p.grad for p in self.buckets[b] if p.grad is not None]
        if self.size == 1 or not grads:
            self.work[b] = (None, None)
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.work[b] = (flat, dist.all_reduce(flat, group=self.group, async_op=True))  # sum over replicas

    def finish(self) -> None:
        for b in range(len(self.buckets)):
            if b not in self.work:  # a bucket whose parameters got no gradient this step
                self.launch(b)
        for b, (flat, work) in self.work.items():
            grads = [p.grad for p in self.buckets[b] if p.grad is not None]
            if work is not None:
                work.wait()
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
            if self.scale != 1.0:  # 1 / DP: nothing to scale in one process
                torch._foreach_mul_(grads, self.scale)
        self.armed = False


# The flat collectives of the distributed optimizer: torch 2.13 renamed them (the old names warn);
# requirements.txt allows torch 2.6, which has only the old names. Same arguments in both.
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ShardedGradReduce(OverlappedGradReduce):
    """OverlappedGradReduce for --use-distributed-optimizer: each bucket is a FlatBucket and is
    reduce-scattered instead of all-reduced, started at the same moments during the last backward,
    so each rank receives the summed gradients of its own shard only (half an all-reduce's traffic).
    `finish()` waits, scales, hands the shard to the bucket's fp32 masters as their gradients and
    frees the full local gradients, which the step no longer needs."""

    def __init__(self, params: list[torch.nn.Parameter], group: Any, size: int, rank: int, scale: float,
                 bucket_bytes: int = 32 << 20):
        super().__init__(params, group, size, scale, bucket_bytes)
        self.flat = [FlatBucket(bucket, group, size, rank) for bucket in self.buckets]

    def launch(self, b: int) -> None:
        fb = self.flat[b]
        flat = fb.flatten([p.grad for p in fb.params])  # (numel,) zeros where a weight has no gradient, and the padding
        if self.size == 1:
            self.work[b] = (flat, None, flat)
            return
        shard = flat.new_empty(fb.shard_numel)
        # the sum over replicas of this rank's shard only; `flat` stays alive until the wait
        self.work[b] = (shard, reduce_scatter_flat(shard, flat, group=self.group, async_op=True), flat)

    def finish(self) -> None:
        for b in range(len(self.buckets)):
            if b not in self.work:  # a bucket whose parameters got no gradient this step
                self.launch(b)
        for b, (shard, work, _) in self.work.items():
            if work is not None:
                work.wait()
            self.flat[b].set_master_grads(shard.mul_(self.scale))
            for p in self.flat[b].params:
                p.grad = None
        self.work, self.armed = {}, False


def build_grad_reducers(model: torch.nn.Module, pg: ParallelGroups,
                        distributed_optimizer: bool = False) -> list[OverlappedGradReduce]:
    """Dense weights averaged over DP; expert weights summed over the ranks holding the same
    experts (their tokens came from every rank of the EP group already), then divided by DP.

    With the distributed optimizer (and DP > 1; at DP 1 no replica shares the state and the
    flag changes nothing) the same groups reduce-scatter flat buckets instead. An embedding copy
    (MTP under PP) gets a bucket of its own: laid out alike on the first and last stage, so the
    two stages' shards of it hold the same elements and can be summed over the embedding group."""
    params = list(model.parameters())
    dense = [p for p in params if getattr(p, "shard_kind", None) != "ep"]
    experts = [p for p in params if getattr(p, "shard_kind", None) == "ep"]
    if distributed_optimizer and pg.dp > 1:
        copies = [p for p in dense if hasattr(p, "pipeline_copy")]
        dense = [p for p in dense if not hasattr(p, "pipeline_copy")]
        reducers = [ShardedGradReduce(ps, pg.dp_group, pg.dp, pg.dp_rank, 1.0 / pg.dp) for ps in (dense, copies) if ps]
        if experts:
            reducers.append(ShardedGradReduce(experts, pg.expert_dp_group, pg.expert_dp_size, pg.expert_dp_rank,
                                              1.0 / pg.dp))
        return reducers
    reducers = [OverlappedGradReduce(dense, pg.dp_group, pg.dp, 1.0 / pg.dp)]
    if experts:
        reducers.append(OverlappedGradReduce(experts, pg.expert_dp_group, pg.expert_dp_size, 1.0 / pg.dp))
    return reducers


def flat_buckets(reducers: list[OverlappedGradReduce]) -> list[FlatBucket]:
    """The distributed optimizer's buckets (none without it)."""
    return [fb for r in reducers if isinstance(r, ShardedGradReduce) for fb in r.flat]


def gradient_pieces(model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The gradients this rank steps with, each beside its weight: the whole gradients, or with the
    distributed optimizer the fp32 gradients of the pieces in this rank's shards."""
    if isinstance(optimizer, DistributedAdamW):
        return [(piece.param, m.grad) for fb in optimizer.buckets for piece, m in zip(fb.pieces, fb.masters)
                if m.grad is not None]
    return [(p, p.grad) for p in model.parameters() if p.grad is not None]


def sync_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pg: ParallelGroups,
                   reducers: list[OverlappedGradReduce]) -> None:
    """Turn each rank's local gradients into the gradient of the global-batch mean loss.

    - dense and expert weights: the reducers' all-reduces (reduce-scatters with the distributed
      optimizer), started during the last backward;
    - router and q/k-norm weights (and under sequence parallelism every RMSNorm weight and the MTP
      modules' eh_proj): also summed over TP (each TP rank saw part of the tokens / heads / positions;
      sums over TP and DP commute, so the order does not matter);
    - MTP under PP: the embedding's two copies, summed over the embedding group. With the distributed
      optimizer, TP peers (same DP rank) own the same shard of identically laid-out buckets, so
      their pieces of these weights line up; so do the two stages' pieces of the embedding, which
      sits alone in its bucket on both (build_grad_reducers)."""
    for reducer in reducers:
        reducer.finish()
    if pg.tp > 1:
        partial = [g for p, g in gradient_pieces(model, optimizer) if getattr(p, "tp_partial_grad", False)]
        bucketed_all_reduce(partial, pg.tp_group)  # sum partial router / norm grads over TP
    if pg.embedding_group is not None:
        # MTP under PP: the first stage's embedding and the last stage's copy (read by the MTP modules) are one
        # weight; each copy has its own part of the gradient, and both step with the sum, so they stay equal.
        copies = [g for p, g in gradient_pieces(model, optimizer) if hasattr(p, "pipeline_copy")]
        bucketed_all_reduce(copies, pg.embedding_group)  # sum the two copies' embedding gradients


def global_grad_norm(grads: list[tuple[torch.nn.Parameter, torch.Tensor]], pg: ParallelGroups, sharded: bool,
                     device: torch.device) -> torch.Tensor:
    """L2 norm of the full model's gradient, each distinct element counted once.

    A rank's squared norms are divided by how many ranks hold the same elements, then summed
    over all ranks: DP replicas of TP shards, DP x TP replicas of replicated weights,
    (DP x TP) / EP replicas of an expert, twice as many for the embedding with MTP under PP.
    With the distributed optimizer (`sharded`) each element of a bucket sits in one rank's shard
    of its group (DP, or an expert's replicas), so only weights replicated over TP are held more
    than once: TP times; and the embedding with MTP under PP, on two stages."""
    by_replicas: dict[int, list[torch.Tensor]] = {}
    for p, g in grads:
        kind = getattr(p, "shard_kind", None)
        replicas = {"tp": pg.dp, "ep": pg.expert_dp_size}.get(kind, pg.dp * pg.tp)
        replicas *= 2 if hasattr(p, "pipeline_copy") else 1  # MTP under PP: the embedding on two stages
        if sharded:
            replicas //= pg.expert_dp_size if kind == "ep" else pg.dp
        by_replicas.setdefault(replicas, []).append(g)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for replicas, tensors in by_replicas.items():
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).double()  # fused, fp32 even for bf16
        sq += norms.pow(2).sum() / replicas
    if pg.world_size > 1:
        dist.all_reduce(sq, group=None)  # sum over every rank of every stage
    return sq.sqrt()


@torch.no_grad()
def gather_updated_weights(optimizer: DistributedAdamW) -> None:
    """After a step of the distributed optimizer: every rank's updated shard into every rank's weights."""
    for fb in optimizer.buckets:
        shard = optimizer.weight_shard(fb)  # (S,) this rank's updated masters, in the bucket's dtype
        flat = shard
        if fb.size > 1:
            flat = shard.new_empty(fb.numel)
            all_gather_flat(flat, shard, group=fb.group)  # (numel,) every rank's shard of the updated weights
        for p, w in zip(fb.params, fb.views(flat)):
            p.copy_(w)  # rounds to bf16 for bf16 weights


@torch.no_grad()
def gather_for_save(optimizer: DistributedAdamW, pg: ParallelGroups) -> dict:
    """{weight: (its fp32 value, its AdamW state)}, whole, for the weights this rank writes in a checkpoint.

    One bucket at a time (the extra memory is a bucket's, not the model's), its group all-gathers
    the shards of the masters and of both moments. A weight is written by the rank of its group
    whose shard holds its first element (of a weight replicated over TP, TP rank 0's copy): each
    is written once, the writing is spread over the group, and the entries are checkpoint.py's
    whole-slice ones, readable with or without the flag, on any layout."""
    gathered = {}
    for fb in optimizer.buckets:
        full = {}
        for key in ("master", "exp_avg", "exp_avg_sq"):
            shard = fb.shard_of(fb.masters, torch.float32) if key == "master" else optimizer.state_shard(fb, key)
            flat = shard
            if fb.size > 1:
                flat = shard.new_empty(fb.numel)
                all_gather_flat(flat, shard, group=fb.group)  # (numel,) every rank's shard of `key`
            full[key] = fb.views(flat)
        for i, p in enumerate(fb.params):
            replicated = getattr(p, "shard_kind", None) not in ("tp", "ep")
            if fb.owner(p) != fb.rank or (replicated and pg.tp_rank != 0):
                continue
            step = optimizer.step_count(p)
            state = {} if step is None else {"step": step, "exp_avg": full["exp_avg"][i].cpu().clone(),
                                             "exp_avg_sq": full["exp_avg_sq"][i].cpu().clone()}
            gathered[p] = (full["master"][i].cpu().clone(), state)
    return gathered


# =================================================================== evaluation
def evaluate(model: MoETransformer, corpus: Corpus, pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig,
             device: torch.device, autocast_dtype: torch.dtype | None) -> float:
    """Mean LM loss (nats per token) over --eval-iters fixed global batches of the val split."""
    model.eval()
    total = 0.0
    global_batch = tc.micro_batch_size * tc.num_microbatches * pg.dp
    for i in range(tc.eval_iters):
        x, y = get_batch(corpus.val, tc.seed, 1, i, global_batch, mc.seq_length, corpus.vocab_size)
        stats = run_microbatches(model, local_microbatches(x, y, pg, tc, device), pg, mc, tc, device,
                                 autocast_dtype, train=False)
        total += reduce_step_stats(stats, pg, mc, tc)["lm_loss"]
    model.train()
    return total / tc.eval_iters


def bits_per_byte(corpus: Corpus, loss: float) -> float | None:
    """A loss in nats per token as bits per byte of text, which compares across tokenizers:
    nats / ln 2 x the val split's tokens per byte (byte data: one token per byte). None when the
    data does not say how many bytes its tokens stand for (token files whose meta.json has no "bytes")."""
    if not corpus.val_bytes:
        return None
    return loss / math.log(2) * len(corpus.val) / corpus.val_bytes


# ==================================================================== the step
def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, reducers: list[OverlappedGradReduce],
               micro: list[tuple[torch.Tensor, torch.Tensor]], pg: ParallelGroups, mc: ModelConfig,
               tc: TrainConfig, device: torch.device, autocast_dtype: torch.dtype | None,
               step: int, timer: PipelineTimer | None = None) -> tuple[StepStats, torch.Tensor, bool]:
    """One optimizer step on this rank's micro-batches: what the trainer runs and the benchmarks time.

    Set the learning rate -> (global-batch balancing: route every micro-batch first) ->
    forward and backward of every micro-batch (1F1B) -> gradient all-reduces (reduce-scatters
    with the distributed optimizer) -> global norm -> clip and the optimizer step (AdamW or Muon;
    with the distributed optimizer, then the all-gather of the updated weights), or skip the
    update when the norm is not finite -> expert-bias update.
    Returns this rank's step statistics, the global gradient norm and whether the update was applied.
    `timer` (scripts/bench_pipeline.py) times the forward and backward pipeline and its p2p waits."""
    for group in optimizer.param_groups:
        group["lr"] = tc.schedule().at(step)
    optimizer.zero_grad(set_to_none=True)
    if mc.router_aux_loss_type == "global-batch" and mc.all_moe_layers:
        # f_i of the whole global batch must be known before any backward: a forward-only pass
        # over every micro-batch routes the tokens first (one extra forward per step).
        pre = run_microbatches(model, micro, pg, mc, tc, device, autocast_dtype, train=False, step=step)
        set_global_batch_counts(model, mc, global_expert_counts(pre, pg, routed=True))
    stats = run_microbatches(model, micro, pg, mc, tc, device, autocast_dtype, train=True, step=step,
                             reducers=reducers, timer=timer)
    sync_gradients(model, optimizer, pg, reducers)
    sharded = isinstance(optimizer, DistributedAdamW)
    grads = gradient_pieces(model, optimizer)
    grad_norm = global_grad_norm(grads, pg, sharded, device)
    # The norm is summed over all ranks, so every rank takes the same decision.
    applied = bool(torch.isfinite(grad_norm))  # one host sync per step
    if applied:
        if tc.grad_clip > 0:
            scale = (tc.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0).float()
            torch._foreach_mul_([g for _, g in grads], scale)
        optimizer.step()
        if sharded:
            gather_updated_weights(optimizer)
        if tc.router_bias_update_rate > 0 and mc.all_moe_layers:
            update_expert_bias(model, mc, global_expert_counts(stats, pg, routed=False), tc.router_bias_update_rate)
    return stats, grad_norm, applied


# ================================================================ start-up checks
def fail(message: str, is_main: bool) -> None:
    """Bad input: one line on stderr from rank 0, exit status 2 on every rank."""
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


def fail_together(error: str | None, rank: int, world_size: int) -> None:
    """Every rank reports whether its own checks passed; if any failed, all exit 2 together.

    Ranks on other nodes see other files (data, checkpoints, memory), so one rank alone can
    fail. Without this, that rank would exit and the others would wait in their first
    collective for --dist-timeout; here rank 0 prints the first failing rank's message."""
    if world_size > 1:
        errors: list[str | None] = [None] * world_size
        dist.all_gather_object(errors, error)  # every rank's error message, or None (over the CPU backend)
        failing = [(r, e) for r, e in enumerate(errors) if e]
        if failing:
            r, error = failing[0]
            if any(e != error for _, e in failing) or r != 0:
                error = f"rank {r}: {error}"
    if error:
        fail(error, rank == 0)


def check_writable(root: str, flag: str = "--save") -> None:
    """Fail at start, not after hours of training, when checkpoints (or logs) cannot be written."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise LocalInputError(f"{flag} {root}: not writable ({e.strerror}); choose another folder") from None


def check_metrics_file(path: str) -> None:
    """The metrics file must be a writable regular file, or creatable; checked without touching it."""
    if os.path.isdir(path):
        raise LocalInputError(f"--metrics-file {path}: is a folder; give a file name")
    if os.path.lexists(path):
        if not os.path.isfile(path) or not os.access(path, os.W_OK):
            raise LocalInputError(f"--metrics-file {path}: not a writable regular file")
        return
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise LocalInputError(f"--metrics-file {path}: cannot create its folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise LocalInputError(f"--metrics-file {path}: folder {parent} is not writable")


def check_tensorboard(log_dir: str) -> None:
    if importlib.util.find_spec("tensorboard") is None:  # torch's SummaryWriter needs it
        raise LocalInputError("--tensorboard needs the tensorboard package: pip install -r requirements-extras.txt")
    check_writable(log_dir, "--tensorboard")


def dry_run(mc: ModelConfig, tc: TrainConfig, world_size: int) -> None:
    """--dry-run: check the flags and layout of a launch of `world_size` ranks as that launch
    would (the same validate), then print its memory plan. One process, no process group, no
    data or checkpoint read (the vocabulary is --vocab-size), each stage built on the meta device."""
    try:
        tc.validate()
        validate(mc, tc, world_size)
    except ConfigError as e:
        fail(str(e), True)
    tc.expert_parallel_size = tc.expert_parallel_size or tc.tensor_parallel_size
    device_type = "cpu" if tc.device == "cpu" else "cuda"  # a plan is for the machines of the launch
    bf16 = resolve_param_dtype(tc, torch.device(device_type)) == torch.bfloat16
    print(describe_plan(mc, tc, world_size, device_type, bf16))
    print(f"model config: {json.dumps(dataclasses.asdict(mc))}")
    print(f"train config: {json.dumps(dataclasses.asdict(tc))}")


@dataclass
class RunInputs:
    """What the start-up checks produce: the resolved configs, the data and the checkpoint to resume."""

    mc: ModelConfig
    tc: TrainConfig
    corpus: Corpus
    resume: ckpt_io.Checkpoint | None
    save_lock: Any  # the open lock file of --save (rank 0), held until the run ends
    notes: list[str]  # what rank 0 says at start about a resumed run (schedule, batch, fresh optimizer)


def prepare_inputs(mc: ModelConfig, tc: TrainConfig, given: set[str], rank: int, world_size: int,
                   local_rank: int) -> RunInputs:
    """Every check that needs no communication: flags, checkpoint, data, layout, memory, --save.

    Raises ConfigError / CheckpointError; reads the whole checkpoint, so a bad one fails here."""
    if not tc.load and tc.save and os.path.isdir(tc.save):
        if os.path.lexists(os.path.join(tc.save, "latest")):
            tc.load = tc.save  # auto-resume: a restarted run (torchrun --max-restarts) continues by itself
        elif ckpt_io.list_checkpoints(tc.save):
            raise LocalInputError(f"--save {tc.save} holds checkpoints {ckpt_io.list_checkpoints(tc.save)[-3:]} but no "
                                  f"`latest`; resume one with --load {tc.save}/step_N, or choose another folder")
    resume, notes = None, []
    if tc.load:
        resume = ckpt_io.read_checkpoint(tc.load)
        mc = model_config_from_checkpoint(resume.meta["model"], mc, given, f"{resume.path}/meta.json")
        notes = continue_saved_run(tc, resume, given, world_size)
    tc.validate()  # before the data: --seed and the sizes must be sane to read batches
    schedule = tc.schedule()  # the defaults resolved, so the printed and saved config say what runs
    tc.warmup_steps, tc.lr_decay_steps = schedule.warmup_steps, schedule.decay_steps
    corpus = load_corpus(tc.data, mc.vocab_size if "vocab_size" in given or resume else None)
    if (resume or "vocab_size" in given) and corpus.vocab_size != mc.vocab_size:
        raise LocalInputError(f"--data {tc.data or '(built-in)'} has vocab {corpus.vocab_size}, "
                              + (f"the checkpoint's model {mc.vocab_size}" if resume else
                                 f"--vocab-size says {mc.vocab_size}; drop the flag"))
    mc.vocab_size = corpus.vocab_size
    validate(mc, tc, world_size)
    if min(len(corpus.train), len(corpus.val)) < mc.seq_length + 2:
        raise LocalInputError(f"data too short: {len(corpus.train)} train / {len(corpus.val)} val tokens, "
                              f"need more than --seq-length {mc.seq_length} + 1 in each split")
    if uses_cuda(tc) and local_rank >= torch.cuda.device_count():
        raise LocalInputError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                              f"launch at most that many processes per node")
    device_type = "cuda" if uses_cuda(tc) else "cpu"
    check_memory(mc, tc, world_size, local_rank, device_type,
                 resolve_param_dtype(tc, torch.device(device_type)) == torch.bfloat16)
    if tc.metrics_file and rank == 0:
        check_metrics_file(tc.metrics_file)
    if tc.tensorboard and rank == 0:
        check_tensorboard(tc.tensorboard)
    save_lock = None
    if tc.save:
        check_writable(tc.save)
        if rank == 0:
            save_lock = ckpt_io.acquire_save_lock(tc.save)
    tc.expert_parallel_size = tc.expert_parallel_size or tc.tensor_parallel_size
    return RunInputs(mc, tc, corpus, resume, save_lock, notes)


# ======================================================================== the run
def report_eval_only(model: MoETransformer, corpus: Corpus, pg: ParallelGroups, mc: ModelConfig,
                     tc: TrainConfig, device: torch.device, autocast_dtype: torch.dtype | None, step: int) -> None:
    """--eval-only: validation loss of a checkpoint, as perplexity and bits per byte (any tokenizer:
    nats per token / ln 2 x the val split's tokens per byte of text; byte data has one token per byte)."""
    val_loss = evaluate(model, corpus, pg, mc, tc, device, autocast_dtype)
    if pg.is_main:
        line = f"eval-only: step {step} | val loss {val_loss:.4f} nats/token | perplexity {math.exp(val_loss):.3f}"
        bpb = bits_per_byte(corpus, val_loss)
        if bpb is not None:
            line += f" | {bpb:.4f} bits per byte"
        print(line)
        if tc.metrics_file:
            with open(tc.metrics_file, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": val_loss, **({"val_bpb": bpb} if bpb else {})}) + "\n")


def save(tc: TrainConfig, mc: ModelConfig, pg: ParallelGroups, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, step: int, skipped: int) -> str:
    """Write a checkpoint of the state after `step` updates (all ranks call this)."""
    gathered = gather_for_save(optimizer, pg) if isinstance(optimizer, DistributedAdamW) else None
    payload = ckpt_io.rank_payload(model, optimizer, pg.tp_rank, pg.dp_rank,
                                   pg.rank % (pg.dp * pg.tp), pg.ep, gathered)
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": step,
            "skipped_steps": skipped, "model": dataclasses.asdict(mc), "train": dataclasses.asdict(tc),
            "layout": {"world_size": pg.world_size, "tp": pg.tp, "pp": pg.pp, "dp": pg.dp, "ep": pg.ep},
            "software": software()}  # for the reader: a resume on other threads or torch is allowed
    try:
        return ckpt_io.save_checkpoint(tc.save, step, payload, meta, pg.rank, pg.world_size, tc.keep_last)
    except OSError as e:  # a full disk, a vanished folder: the save is atomic, so nothing older is harmed
        print(f"error: rank {pg.rank}: saving step {step} to {tc.save} failed ({e.strerror or e}); the previous "
              f"checkpoint and `latest` are intact", file=sys.stderr, flush=True)
        sys.exit(2)  # torchrun then stops the other ranks


class StopRequest:
    """SIGTERM (what SLURM and Kubernetes send before a kill) or SIGINT asks the run to stop after
    the current step, saving a checkpoint; a second SIGINT stops at once.

    The handler only sets a flag; ranks agree on it after every step (one all-reduce), so all
    stop after the same step even when the signal reaches them at different moments."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # Ctrl-C twice: the default behaviour, at once
            signal.signal(signum, self.previous[signum])

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, pg: ParallelGroups) -> bool:
        flag = torch.tensor([0 if self.signum is None else 1])
        if pg.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=None)  # did any rank get a signal? (CPU backend)
        return bool(flag.item())


# Dense bf16 peak FLOP/s by a substring of the CUDA device name; the first match wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def uses_cuda(tc: TrainConfig) -> bool:
    """Whether this run trains on a GPU: --device cuda, or auto with one visible."""
    return tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())


def resolve_device(tc: TrainConfig, local_rank: int) -> torch.device:
    if uses_cuda(tc):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_autocast(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 matmuls under every bf16 scheme; with bf16 weights autocast's casts are no-ops, and it
    still runs the few ops it keeps in fp32 (softmax-like reductions) there."""
    if tc.dtype in ("bfloat16", "bfloat16-autocast") or (tc.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_param_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype the model's weights are stored and computed in (the optimizer keeps fp32 masters)."""
    if tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_model(mc: ModelConfig, tc: TrainConfig, pg: ParallelGroups, device: torch.device,
                autocast_dtype: torch.dtype | None) -> MoETransformer:
    """This rank's slice of the model, with the expert kernel, recomputation and compilation chosen."""
    model = MoETransformer(mc, model_parallel_for(pg, mc, tc), seed=tc.seed).to(device)
    dtype = resolve_param_dtype(tc, device)
    for name, p in model.named_parameters():
        # Routers stay fp32: small score differences decide the expert choice (they compute in fp32).
        if not name.endswith("router.weight"):
            p.data = p.data.to(dtype)  # weights only: buffers (expert_bias, rotary tables) stay fp32
    grouped = can_use_grouped_mm(device, mc, autocast_dtype or torch.float32)
    for module in model.modules():
        if hasattr(module, "use_grouped_mm"):
            module.use_grouped_mm = grouped
    model.recompute = tc.recompute
    if tc.compile:
        for block in [*model.layers.values(), *(module.block for module in model.mtp)]:
            block.compile()  # each block on its own: pipeline stages and checkpointing stay eager
    return model


def resume_from(resume: ckpt_io.Checkpoint, model: MoETransformer, optimizer: torch.optim.Optimizer,
                pg: ParallelGroups, tc: TrainConfig) -> tuple[int, int]:
    """Load this rank's slices of a checkpoint; return (step, skipped steps) and say what resumed."""
    ckpt_io.load_into(resume, model, optimizer)
    step, skipped = resume.meta["step"], resume.meta.get("skipped_steps", 0)
    saved = resume.meta["layout"]
    if saved["world_size"] == pg.world_size and saved["tp"] == pg.tp and saved["pp"] == pg.pp:
        torch.set_rng_state(resume.rng[pg.rank]["torch"])
    if pg.is_main:
        print(f"resumed from {resume.path} at step {step} (saved on layout {saved})")
        later = [d for d in ckpt_io.list_checkpoints(tc.save) if d > ckpt_io.step_dir_name(step)] if tc.save else []
        if later:
            print(f"note: {tc.save} also holds later checkpoints {later[:3]}{'...' if len(later) > 3 else ''} "
                  f"from before this rewind; they are kept, and `latest` will name this run's saves")
    return step, skipped


@dataclass
class Interval:
    """The steps since the last log line: their summed statistics, gradient norms and timing."""

    stats: StepStats | None = None
    steps: int = 0
    grad_norm: torch.Tensor | float = 0.0  # summed on the device: no host sync per step
    seconds: float = 0.0  # wall time of the timed steps (evaluation and saving left out)
    timed_steps: int = 0

    def add(self, stats: StepStats, grad_norm: torch.Tensor, seconds: float | None) -> None:
        if self.stats is None:
            self.stats = stats
        else:
            self.stats.lm_loss += stats.lm_loss
            self.stats.mtp_loss += stats.mtp_loss
            for name in ("aux_loss", "z_loss", "counts", "routed", "dropped"):
                setattr(self.stats, name, getattr(self.stats, name) + getattr(stats, name))
        self.steps += 1
        self.grad_norm = self.grad_norm + grad_norm
        if seconds is not None:
            self.seconds += seconds
            self.timed_steps += 1


def train_loop(model: MoETransformer, optimizer: torch.optim.Optimizer, reducers: list[OverlappedGradReduce],
               corpus: Corpus, pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig, device: torch.device,
               autocast_dtype: torch.dtype | None, start_step: int, skipped_total: int) -> None:
    """Steps start_step .. --max-steps: batches, train_step, logging, evaluation, checkpoints, summary."""
    is_main = pg.is_main
    global_batch = tc.micro_batch_size * tc.num_microbatches * pg.dp
    peak_flops = peak_bf16_flops(device)
    bar = None
    if is_main and tc.progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
    say = (bar.write if bar else print) if is_main else (lambda line: None)
    log = None
    if is_main:  # model FLOPs of the whole step over the peak of all GPUs
        log = RunLog(tc.metrics_file, tc.tensorboard, start_step, say, lambda tokens_per_sec: (
            tokens_per_sec * mc.flops_per_token() / (peak_flops * pg.world_size) if peak_flops else None))
    stop = StopRequest()
    stop.install()
    start_time = time.time()
    val_loss, last, bad_in_a_row, done, interval = None, {}, 0, start_step, Interval()
    try:
        for step in range(start_step, tc.max_steps):
            t0 = time.time()
            x, y = get_batch(corpus.train, tc.seed, 0, step, global_batch, mc.seq_length, corpus.vocab_size)
            micro = local_microbatches(x, y, pg, tc, device)
            stats, grad_norm, applied = train_step(model, optimizer, reducers, micro, pg, mc, tc, device,
                                                   autocast_dtype, step)
            done = step + 1
            if not applied:
                skipped_total += 1
                bad_in_a_row += 1
                say(f"Step {done} | non-finite gradient norm: update skipped "
                    f"({bad_in_a_row} in a row, {skipped_total} in all)")
                if bad_in_a_row >= tc.max_skipped_steps:
                    if tc.save:
                        save(tc, mc, pg, model, optimizer, step, skipped_total)
                    fail(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient norm (last: step {done}); "
                         f"lower --lr or raise --router-z-loss-coef, then resume"
                         + (f" from {tc.save}" if tc.save else ""), is_main)
            else:
                bad_in_a_row = 0
            logging = done % tc.log_interval == 0 or done == tc.max_steps
            if logging and device.type == "cuda":
                torch.cuda.synchronize()  # the step's kernels finish inside its timing
            # The first step after a start carries allocation and compilation: untimed unless alone.
            first_of_many = step == start_step and not logging
            interval.add(stats, grad_norm, None if first_of_many else time.time() - t0)
            if logging:
                last = reduce_step_stats(interval.stats, pg, mc, tc, steps=interval.steps)
                grad_norm_mean = float(interval.grad_norm) / interval.steps
                samples_per_sec = interval.timed_steps * global_batch / max(interval.seconds, 1e-9)
                if log:
                    log.train(done, last, tc.schedule().at(step), grad_norm_mean, samples_per_sec,
                              samples_per_sec * mc.seq_length, skipped_total)
                interval = Interval()
            if tc.eval_interval > 0 and (done % tc.eval_interval == 0 or done == tc.max_steps):
                val_loss = evaluate(model, corpus, pg, mc, tc, device, autocast_dtype)
                if log:
                    log.eval(done, val_loss, bits_per_byte(corpus, val_loss))
            stopping = stop.agreed(pg)
            if tc.save and ((tc.save_interval > 0 and done % tc.save_interval == 0) or done == tc.max_steps
                            or stopping):
                say(f"Step {done} | saved {save(tc, mc, pg, model, optimizer, done, skipped_total)}")
            if bar:
                bar.update(1)
            if stopping:
                say(f"stopped by {signal.Signals(stop.signum or signal.SIGTERM).name} after step {done}"
                    + (f"; resume with the same command (it continues from {tc.save})" if tc.save
                       else " (no --save: nothing kept)"))
                break
    finally:
        stop.restore()
        if bar:
            bar.close()
        if log:
            log.close()

    # --------------------------------------------------------------- summary
    peak = torch.tensor([peak_memory_mib(device)], device=device)
    if pg.world_size > 1:
        peaks = [torch.zeros_like(peak) for _ in range(pg.world_size)]
        dist.all_gather(peaks, peak, group=None)  # every rank's peak memory, for the summary
        peak = torch.cat(peaks)
    if is_main:
        steps = done - start_step
        print_run_summary(steps, steps * global_batch * mc.seq_length, time.time() - start_time, last, val_loss,
                          unigram_entropy(corpus.val, mc.vocab_size), peak.tolist(),
                          "CUDA allocated" if device.type == "cuda" else "resident")
        if tc.save:
            print(f"checkpoints: {tc.save} (latest: {ckpt_io.read_latest(tc.save)})")
        if tc.metrics_file:
            print(f"metrics: {tc.metrics_file}")


def main(argv: list[str] | None = None) -> None:
    # ---------------------------------------------------------------- config
    mc, tc, given = parse_config(argv)
    if tc.dry_run:  # the plan of a launch, printed by one process: nothing runs
        dry_run(mc, tc, tc.world_size or int(os.environ.get("WORLD_SIZE", 1)))
        return
    try:  # set by torchrun (or by hand for a multi-node launch without it)
        rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in
                                        (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        if not 0 <= rank < world_size or local_rank < 0:
            raise ValueError
    except ValueError:
        fail(f"RANK={os.environ.get('RANK')} WORLD_SIZE={os.environ.get('WORLD_SIZE')} "
             f"LOCAL_RANK={os.environ.get('LOCAL_RANK')} are not a valid launch; use torchrun", True)
    inputs, error = None, None
    try:
        inputs = prepare_inputs(mc, tc, given, rank, world_size, local_rank)
    except (LocalInputError, DataError, ckpt_io.CheckpointError, NotEnoughMemory) as e:
        error = str(e)  # this rank's files or machine: settled with the others below
    except ConfigError as e:
        fail(str(e), rank == 0)  # flags and layout fail alike on every rank: no peer needed

    # ---------------------------------------------------- distributed setup
    if world_size > 1:
        # gloo for CPU tensors (the start-up agreement, stop flags), NCCL for CUDA tensors.
        backend = "cpu:gloo,cuda:nccl" if uses_cuda(tc) and torch.cuda.is_available() else "gloo"
        timeout = tc.dist_timeout if error is None else 300.0  # the flag itself may be what is wrong
        init_process_group(backend, rank, world_size, timedelta(seconds=timeout))
    fail_together(error, rank, world_size)  # all ranks passed their checks, or all exit 2 now
    try:
        run(inputs, rank, world_size, local_rank)
    finally:
        if inputs.save_lock:
            inputs.save_lock.close()
    if world_size > 1:
        dist.destroy_process_group()


def size_text(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def software() -> dict:
    """What the numbers of a CPU run depend on besides the flags: the thread count decides how
    torch splits float sums, the kernels and the torch version how it computes them."""
    return {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


def software_text() -> str:
    sw = software()
    return f"torch {sw['torch']}, {sw['cpu_threads']} CPU threads per rank ({sw['cpu_kernels']})"


def print_banner(inputs: RunInputs, pg: ParallelGroups, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
    """What is about to run, before anything is allocated: device and precision, model size,
    layout, data, batch and schedule, the memory estimate, notes on a resume, the full config."""
    mc, tc, corpus = inputs.mc, inputs.tc, inputs.corpus
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        "no CUDA device visible" if tc.device == "auto" else "--device cpu")
    weights = resolve_param_dtype(tc, device)
    precision = "fp32" if weights == torch.float32 else "bf16 with fp32 master weights"
    print("=" * 28 + " run " + "=" * 28)
    print(f"device: {device.type} ({where}) x {pg.world_size} rank{'s' if pg.world_size > 1 else ''} | weights {precision} | "
          f"autocast {autocast_dtype or 'off'} | grouped GEMM "
          f"{can_use_grouped_mm(device, mc, autocast_dtype or torch.float32)} | {software_text()}")
    experts = (f"{mc.num_experts} experts top-{mc.num_experts_per_token} in layers {mc.moe_layers}"
               if mc.num_experts else "dense")
    if mc.mtp_num_layers:
        experts += f" | {mc.mtp_num_layers} MTP modules (layers {mc.mtp_layers}), loss coef {tc.mtp_loss_coef:g}"
    print(f"model: {params_per_stage(mc, 1, 1, 1)[0]:,} parameters, {mc.active_params_per_token():,} active per "
          f"token (embedding lookup excluded) | {mc.num_layers} layers, hidden {mc.hidden_size}, {experts}")
    layout = describe_layout(pg, mc, tc).split("\n")
    print("\n".join(layout[:17] + ([f"  ... {len(layout) - 17} more ranks"] if len(layout) > 17 else [])))
    print(f"data: {corpus.description}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens")
    global_batch = tc.micro_batch_size * tc.num_microbatches * pg.dp
    print(f"batch: {global_batch} sequences x {mc.seq_length} tokens per step ({tc.micro_batch_size} per "
          f"micro-batch x {tc.num_microbatches} micro-batches x DP {pg.dp}), {tc.max_steps} steps | "
          f"{tc.optimizer} | LR: {tc.schedule().describe()}")
    state, acts = estimate_rank_bytes(mc, tc, pg.world_size, weights == torch.bfloat16, device.type == "cuda")
    print(f"memory per rank (estimate): {size_text(state)} weights, gradients and optimizer state + at least "
          f"{size_text(acts)} activations")
    optim_bytes = optimizer_bytes_per_rank(mc, tc, pg.world_size, weights == torch.bfloat16)
    if not tc.use_distributed_optimizer:
        sharding = "each rank holds all of it; --use-distributed-optimizer shards it over DP"
    elif pg.dp == 1:
        sharding = "--use-distributed-optimizer changes nothing at DP 1: no replica to share it with"
    else:
        sharding = (f"--use-distributed-optimizer: dense weights' state / DP {pg.dp}, experts' / their "
                    f"{pg.expert_dp_size} replica{'s' if pg.expert_dp_size > 1 else ''}")
    print(f"optimizer state per rank (estimate): {size_text(optim_bytes)} ({sharding})")
    for note in inputs.notes:
        print(f"note: {note}")
    print(f"model config: {json.dumps(dataclasses.asdict(mc))}")
    print(f"train config: {json.dumps(dataclasses.asdict(tc))}")


def run(inputs: RunInputs, rank: int, world_size: int, local_rank: int) -> None:
    """Process groups, model, optimizer and checkpoint, then training (or evaluation) to the end."""
    mc, tc, corpus, resume = inputs.mc, inputs.tc, inputs.corpus, inputs.resume
    device = resolve_device(tc, local_rank)
    pg = build_process_groups(tc.tensor_parallel_size, tc.pipeline_parallel_size, tc.expert_parallel_size,
                              rank, world_size, embedding_groups=mc.mtp_num_layers > 0)
    autocast_dtype = resolve_autocast(tc, device)
    if pg.is_main:
        print_banner(inputs, pg, device, autocast_dtype)

    # ------------------------------------------------- model and optimizer
    model = build_model(mc, tc, pg, device, autocast_dtype)
    reducers = build_grad_reducers(model, pg, tc.use_distributed_optimizer)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, kind=tc.optimizer, buckets=flat_buckets(reducers))
    start_step, skipped, error = 0, 0, None
    if resume:
        try:  # tensors of another model fail here, on every rank alike
            start_step, skipped = resume_from(resume, model, optimizer, pg, tc)
        except ckpt_io.CheckpointError as e:
            error = str(e)
        fail_together(error, rank, world_size)
        inputs.resume = resume = None  # free the whole checkpoint's tensors

    # ----------------------------------------------------------- training
    try:
        if tc.eval_only:
            report_eval_only(model, corpus, pg, mc, tc, device, autocast_dtype, start_step)
        elif start_step >= tc.max_steps:
            if pg.is_main:
                print(f"nothing to do: the checkpoint is at step {start_step} and --max-steps is {tc.max_steps}; "
                      f"raise --max-steps to train on")
        else:
            train_loop(model, optimizer, reducers, corpus, pg, mc, tc, device, autocast_dtype, start_step, skipped)
    except DataError as e:  # a token file with ids past the vocabulary, found by a batch: every rank alike
        fail(str(e), pg.is_main)


if __name__ == "__main__":
    main()
