"""Everything before step 0 of minimal_pretrain.py: the config, the command line, the layout, the
checks, the banner. A run's start-up reads top to bottom:

    parse_config        flags -> ModelConfig, TrainConfig and the names of the flags given (from the parser)
    prepare_inputs      checks that need no communication: a resumed run's config (continue_saved_run),
                        the data, resolve_layout (the one Layout of the launch), memory, the output paths
    fail / fail_together    bad input ends every rank with exit 2 and one `error:` line (ConfigError)
    resolve_device, resolve_autocast, resolve_param_dtype   where and in which precision it runs
    dry_run             --dry-run: the plan of a launch, then exit
    print_banner        what is about to run, on rank 0
    StopRequest         SIGTERM / SIGINT: stop after the current step, saving

Each train flag is a TrainConfig field whose metadata holds its help text (and choices): --help,
the banner's config lines and README_MOE.md's flag tables all come from those fields. The model's
flags are ModelConfig's fields (moe_layers.py), which carry theirs the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shlex
import signal
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import checkpoint as ckpt_io
import outputs
from data import Corpus, DataError, load_corpus, load_tokenizer
from memory import (NotEnoughMemory, check_memory, describe_plan, estimate_rank_bytes, layers_text,
                    optimizer_bytes_per_rank, params_per_stage)
from metrics import LINE_WIDTH
from moe_layers import ModelConfig, arg, can_use_grouped_mm
from optim import LRSchedule, lr_schedule
from parallel_layers import Layout
from sampling import run_prompt


# ================================================================== bad input
class ConfigError(ValueError):
    """Bad input: one `error:` line, exit status 2, fast. The one exception start-up raises.

    local=False: flags or layout, wrong alike on every rank, so each rank exits at once.
    local=True: found in this rank's own files or machine (--save, --metrics-file, data, checkpoint,
    memory, GPUs); another node may not see it, so ranks agree before exiting (fail_together)."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


def local_error(message: str) -> ConfigError:
    return ConfigError(message, local=True)


# ======================================================== the training config
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
    sample_interval: int = arg(0, "every this many steps (and at the end) rank 0 prints the greedy continuation of "
                                  "--sample-prompt, from the weights of every rank; 0 = off")
    sample_prompt: str = arg("def ", "the text --sample-interval continues, in the run's tokenizer")
    sample_tokens: int = arg(32, "new tokens of each sample (fewer at the tokenizer's end-of-document token or at "
                                 "--seq-length)")
    metrics_file: str = arg("", "write JSON lines of train and eval metrics here (rank 0)")
    tensorboard: str = arg("", "also write the metrics as TensorBoard events into this folder (needs tensorboard)")
    allow_global_batch_change: bool = arg(False, "on --load, train on with a global batch other than the "
                                                 "checkpoint's (a different data stream and gradient noise)")
    save: str = arg("", "checkpoint folder")
    save_interval: int = arg(0, "save every this many steps (and at the end); 0: only at the end")
    keep_last: int = arg(0, "keep only the newest this many checkpoints of this run; 0 keeps all")
    overwrite: bool = arg(False, "hand over existing outputs that are not this run's own: a --save folder holding "
                                 "another run's checkpoints (kept, never pruned), a --metrics-file or "
                                 "--tensorboard folder of other content (replaced)")
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
    config: str = arg("", "a TOML file of flags (keys are flag names, `hidden-size = 64` or `hidden_size = 64`); "
                          "flags on the command line override it; the resolved config is what checkpoints keep")

    def validate(self) -> None:
        """Ranges and finiteness of every field; raise ConfigError naming the flag to change."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name in ("tensor_parallel_size", "pipeline_parallel_size", "num_microbatches", "micro_batch_size",
                     "max_steps", "log_interval", "eval_iters", "max_skipped_steps", "sample_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("expert_parallel_size", "num_layers_per_virtual_stage", "lr_decay_steps", "eval_interval",
                     "save_interval", "keep_last", "world_size", "sample_interval"):
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
        if not self.sample_interval and any(getattr(self, n) != defaults[n] for n in SAMPLE_FLAGS):
            raise ConfigError("--sample-prompt and --sample-tokens shape the samples of --sample-interval; add "
                              "--sample-interval N (every N steps)")
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


# =========================================================== the command line
class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its complaint on one `error:` line (it prints `prog: error:`), exit status 2, and
    no abbreviations: `--hidden 32` is refused, not read as `--hidden-size 32` (the trainer and every
    script build their parsers from this class)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
    ("checkpoints", ("save", "save_interval", "keep_last", "load", "overwrite", "allow_global_batch_change")),
    ("evaluation and logging", ("eval_interval", "eval_iters", "eval_only", "log_interval", "sample_interval",
                                "sample_prompt", "sample_tokens", "metrics_file", "tensorboard", "progress")),
    ("config file", ("config",)),
)


def build_arg_parser() -> argparse.ArgumentParser:
    """One flag per config field, named after it (`num_experts` -> `--num-experts`), in FLAG_GROUPS."""
    p = ArgumentParser(description="Pretrain a sparse Mixture-of-Experts language model with DP / TP / PP / EP.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       usage="[torchrun --nproc_per_node=N] minimal_pretrain.py [flags]")
    fields = {f.name: f for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}
    for title, names in FLAG_GROUPS:
        group = p.add_argument_group(title)
        for name in names:
            f = fields[name]
            flag, help_text = "--" + name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
            if field_kind(f) is bool:
                group.add_argument(flag, default=f.default, help=help_text, action=argparse.BooleanOptionalAction)
            else:
                group.add_argument(flag, default=f.default, type=field_kind(f), help=help_text,
                                   choices=f.metadata.get("choices"))
    return p


def parse_config(argv: list[str] | None = None) -> tuple[ModelConfig, TrainConfig, set[str]]:
    """Flags (and a --config TOML file under them) -> (model config, train config, names of the flags
    given explicitly, on the command line or in the file)."""
    parser = build_arg_parser()
    from_file = config_file_values(parser, argv)
    parser.set_defaults(**from_file)  # the file's values, which the command line overrides
    args = parser.parse_args(argv)
    # Which flags were given, from the parser itself (never by reading argv): parse again with every
    # default replaced by a marker; the names whose value is not the marker came from the command line.
    unset = object()
    probe = build_arg_parser()
    probe.set_defaults(**{name: unset for name in vars(args)})
    given = {name for name, value in vars(probe.parse_args(argv)).items() if value is not unset} | set(from_file)
    model = ModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)})
    train = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    return model, train, given


def config_file_values(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """The flags of --config FILE.toml, by field name, each checked against its field's type and
    choices (a wrong one is the parser's one `error:` line); {} without --config."""
    import tomllib  # Python >= 3.11: no dependency
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        parser.error(f"--config {path}: {getattr(e, 'strerror', None) or e}")
    fields = {f.name: f for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields or name == "config" or isinstance(value, (dict, list)):
            parser.error(f"--config {path}: {key} is not a flag of this trainer (keys are flag names, "
                         f"e.g. hidden-size = 64)")
        kind, choices = field_kind(fields[name]), fields[name].metadata.get("choices")
        fits = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool))
        if not fits or (choices and value not in choices):
            parser.error(f"--config {path}: {key} = {value!r} is not {'an' if kind is int else 'a'} {kind.__name__}"
                         + (f" among {choices}" if choices else ""))
        values[name] = float(value) if kind is float else value
    return values


# =============================================================== resume rules
# Train flags that define which sequences a step sees: on --load they default to the checkpoint's.
DATA_STREAM_FLAGS = ("seed", "data", "micro_batch_size")


# Train flags that shape the learning rate: on --load they default to the checkpoint's too, so a
# resumed run goes on with the schedule it was following (a longer --max-steps alone keeps it).
SCHEDULE_FLAGS = ("lr", "min_lr", "warmup_steps", "lr_decay_steps", "lr_schedule", "lr_decay_fraction",
                  "lr_decay_style")


# The flags that shape only WSD's decay (the cosine schedule refuses values other than their defaults).
WSD_FLAGS = ("lr_decay_fraction", "lr_decay_style")


# The flags that shape only --sample-interval's samples (refused without it, as the WSD flags are).
SAMPLE_FLAGS = ("sample_prompt", "sample_tokens")


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


def continue_saved_run(tc: TrainConfig, resume: ckpt_io.Checkpoint, given: set[str],
                       world_size: int) -> tuple[TrainConfig, list[str]]:
    """The train config that continues the saved run, and the notes to print at start; `tc` is not changed.

    The data stream (seed, data, micro-batch size), the LR schedule and the optimizer default
    to the checkpoint's. The global batch must stay the checkpoint's: when --num-microbatches is not
    given it is derived to keep it; a change needs --allow-global-batch-change. A checkpoint
    with weights only (import_hf.py, upcycle.py) starts a fresh optimizer and schedule."""
    saved, where = resume.meta["train"], f"{resume.path}/meta.json"
    # the batches of a resumed run continue the saved stream
    tc = dataclasses.replace(tc, **{name: saved_value(saved, name, where) for name in DATA_STREAM_FLAGS
                                    if name not in given and name in saved})
    if not resume.optim:
        return tc, [f"{resume.path} holds weights only (imported or upcycled): the optimizer state is fresh and the "
                    f"LR schedule starts at step 0 with its warm-up"]
    if tc.eval_only:
        return tc, []
    tc, optimizer_notes = resumed_optimizer(tc, saved, given, where)
    tc, schedule_notes = resumed_schedule(tc, saved, given, where, resume.meta["step"])
    tc, batch_notes = resumed_global_batch(tc, saved, given, where, resume.meta, world_size)
    return tc, optimizer_notes + schedule_notes + batch_notes


def resumed_optimizer(tc: TrainConfig, saved: dict, given: set[str], where: str) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's optimizer unless --optimizer is given; a switch keeps what state it can."""
    old_optimizer = saved_value(saved, "optimizer", where)  # "adamw" for checkpoints from before Muon
    if "optimizer" not in given:
        return dataclasses.replace(tc, optimizer=old_optimizer), []
    if tc.optimizer == old_optimizer:
        return tc, []
    return tc, [f"the checkpoint was trained with {old_optimizer}, this run uses --optimizer {tc.optimizer}: the "
                f"hidden matrices' optimizer state starts fresh (AdamW's moments <-> Muon's momentum); the "
                f"embedding, LM head, norm and router moments go on"]


def resumed_schedule(tc: TrainConfig, saved: dict, given: set[str], where: str,
                     step: int) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's LR schedule, with the schedule flags given on top; a note on what changes at `step`."""
    old = {name: saved_value(saved, name, where) for name in SCHEDULE_FLAGS + ("max_steps",)}
    old_schedule = lr_schedule(old["lr"], old["min_lr"], old["warmup_steps"], old["lr_decay_steps"],
                               max(1, old["max_steps"]), old["lr_schedule"], old["lr_decay_fraction"],
                               old["lr_decay_style"])
    kept = dict(old, warmup_steps=old_schedule.warmup_steps, lr_decay_steps=old_schedule.decay_steps)
    schedule = tc.lr_schedule if "lr_schedule" in given else kept["lr_schedule"]
    # a cosine schedule leaves the WSD flags at their defaults (it refuses others)
    tc = dataclasses.replace(tc, **{name: kept[name] for name in SCHEDULE_FLAGS
                                    if name not in given and not (name in WSD_FLAGS and schedule == "cosine")})
    new_schedule = tc.schedule()
    if new_schedule != old_schedule:
        changed = ", ".join(f"--{n.replace('_', '-')} {flag_text(kept[n])} -> {flag_text(getattr(tc, n))}"
                            for n in SCHEDULE_FLAGS if getattr(tc, n) != kept[n] and n in given)
        return tc, [f"the LR schedule changes at step {step} ({changed}): the LR goes from "
                    f"{old_schedule.at(step):.2e} to {new_schedule.at(step):.2e}"]
    if tc.max_steps > new_schedule.decay_steps:
        longer = lr_schedule(tc.lr, tc.min_lr, new_schedule.warmup_steps, tc.max_steps, tc.max_steps,
                             tc.lr_schedule, tc.lr_decay_fraction, tc.lr_decay_style)
        return tc, [f"the checkpoint's LR schedule goes on: its decay ends at step {new_schedule.decay_steps}, so "
                    f"steps {max(step, new_schedule.decay_steps)}-{tc.max_steps} train at --min-lr "
                    f"{tc.min_lr:.2e}; to decay over the longer run give --lr-decay-steps {tc.max_steps} "
                    f"(the LR at step {step} then goes from {old_schedule.at(step):.2e} to {longer.at(step):.2e})"]
    return tc, []


def resumed_global_batch(tc: TrainConfig, saved: dict, given: set[str], where: str, meta: dict,
                         world_size: int) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's global batch (sequences per step): --num-microbatches derived to keep it
    unless given; a change only with --allow-global-batch-change."""
    step = meta["step"]
    old_batch = (saved_value(saved, "micro_batch_size", where) * saved_value(saved, "num_microbatches", where)
                 * meta["layout"]["dp"])
    # the DP this launch will have, by Layout's rule (resolve_layout checks the sizes after this)
    dp = max(1, Layout(world_size=world_size, tp=max(1, tc.tensor_parallel_size),
                       pp=max(1, tc.pipeline_parallel_size)).dp)
    per_micro = tc.micro_batch_size * dp
    notes = []
    if "num_microbatches" not in given and old_batch % per_micro == 0 and old_batch // per_micro != tc.num_microbatches:
        tc = dataclasses.replace(tc, num_microbatches=old_batch // per_micro)
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
    return tc, notes


# ================================================================= the layout
# Bounds far past any real model (Qwen3-235B: hidden 4096, 94 layers, vocab 151,936) that keep every
# tensor size inside int64 and let --dry-run build each layer on the meta device in seconds.
SIZE_FLAGS = ("vocab_size", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
              "moe_ffn_hidden_size", "num_experts", "num_shared_experts", "shared_expert_ffn_hidden_size", "seq_length")
MAX_SIZE, MAX_LAYERS = 2**22, 1024


def resolve_layout(mc: ModelConfig, tc: TrainConfig, world_size: int, rank: int = 0) -> Layout:
    """The model's own checks, then the layout's: flags that fit each other and the world size
    (TrainConfig.validate has checked each train flag on its own first); returns the one Layout
    every later step reads its sizes from. Needs no communication."""
    try:
        mc.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    too_big = [n for n in SIZE_FLAGS if getattr(mc, n) > MAX_SIZE] + (["num_layers"] if mc.num_layers > MAX_LAYERS else [])
    if too_big:
        raise ConfigError(f"--{too_big[0].replace('_', '-')} {getattr(mc, too_big[0])} is beyond any model this trainer "
                          f"builds (widths and lengths up to {MAX_SIZE:,}, up to {MAX_LAYERS:,} layers)")
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
    return Layout(world_size=world_size, tp=tp, pp=pp, ep=ep, sequence_parallel=tc.sequence_parallel,
                  layers_per_chunk=per_chunk, num_microbatches=tc.num_microbatches,
                  micro_batch_size=tc.micro_batch_size, rank=rank)


def describe_layout(layout: Layout, mc: ModelConfig) -> str:
    """One line per rank: its stage, layers (each chunk's under interleaving), TP slice and experts
    (printed once by rank 0)."""
    sp = (f" with sequence parallelism ({mc.seq_length // layout.tp} of {mc.seq_length} positions per TP rank "
          f"between layers)" if layout.sequence_parallel else "")
    lines = [f"layout: world {layout.world_size} = PP {layout.pp} x DP {layout.dp} x TP {layout.tp}{sp}, "
             f"EP {layout.ep}"]
    chunks = len(layout.chunks(mc.num_layers))
    if chunks > 1:
        lines[0] += f" | interleaved 1F1B: {chunks} chunks of {layout.layers_per_chunk} layer(s) per rank"
    e_local = mc.num_experts // layout.ep if mc.num_experts else 0
    for r in range(layout.world_size):
        at = dataclasses.replace(layout, rank=r)
        e = at.ep_rank
        experts = f"experts {e * e_local}-{(e + 1) * e_local - 1}" if e_local else "dense"
        lines.append(f"  rank {r}: stage {at.pp_rank} {layers_text(at.chunks(mc.num_layers))} | dp {at.dp_rank} | "
                     f"tp {at.tp_rank}/{layout.tp} | {experts}")
    return "\n".join(lines)


# ============================================================ start-up checks
def fail(message: str, is_main: bool) -> None:
    """Bad input: one line on stderr from rank 0, exit status 2 on every rank."""
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


def fail_together(error: str | None, rank: int, world_size: int, fingerprint: str = "") -> None:
    """Every rank reports whether its own checks passed; if any failed, all exit 2 together.

    Ranks on other nodes see other files (data, checkpoints, memory), so one rank alone can
    fail. Without this, that rank would exit and the others would wait in their first
    collective for --dist-timeout; here rank 0 prints the first failing rank's message.
    `fingerprint` (see run_fingerprint) must be the same on every rank: ranks that resolved
    another checkpoint or config would train different models in lockstep, or hang."""
    if world_size > 1:
        reports: list[tuple[str | None, str]] = [(None, "")] * world_size
        dist.all_gather_object(reports, (error, fingerprint))  # every rank's error or None, and what it resolved
        failing = [(r, e) for r, (e, _) in enumerate(reports) if e]
        if failing:
            r, error = failing[0]
            if any(e != error for _, e in failing) or r != 0:
                error = f"rank {r}: {error}"
        elif any(f != fingerprint for _, f in reports):
            r = next(r for r, (_, f) in enumerate(reports) if f != reports[0][1])
            error = (f"ranks disagree: rank 0 resolved {reports[0][1]}, rank {r} {reports[r][1]}; launch every "
                     f"rank with the same flags, --data and checkpoint files")
    if error:
        fail(error, rank == 0)


def run_fingerprint(inputs: RunInputs | None) -> str:
    """What a rank resolved at start, in words and hashes: the checkpoint (step, hash of its meta.json)
    and the configs (hash of both, resolved), which every rank must share."""
    if inputs is None:  # this rank failed its checks: fail_together reports that instead
        return ""
    configs = json.dumps([dataclasses.asdict(inputs.mc), dataclasses.asdict(inputs.tc)], sort_keys=True)
    text = f"config {hashlib.sha256(configs.encode()).hexdigest()[:12]}"
    if inputs.resume is not None:
        meta = json.dumps(inputs.resume.meta, sort_keys=True).encode()
        text = (f"checkpoint step {inputs.resume.meta['step']} (meta.json "
                f"{hashlib.sha256(meta).hexdigest()[:12]}), " + text)
    return text


def check_writable(root: str, flag: str = "--save") -> None:
    """Fail at start, not after hours of training, when checkpoints (or logs) cannot be written."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise local_error(f"{flag} {root}: not writable ({e.strerror}); choose another folder") from None


def check_metrics_file(path: str, overwrite: bool, inputs: dict[str, str]) -> None:
    """New, or a metrics file of ours (outputs.claim); its folder is created now so a bad one fails at start."""
    outputs.claim(path, "--metrics-file", outputs.METRICS_FILE, overwrite, inputs)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise local_error(f"--metrics-file {path}: cannot create its folder ({e.strerror})") from None


def check_tensorboard(log_dir: str, overwrite: bool, inputs: dict[str, str]) -> None:
    if importlib.util.find_spec("tensorboard") is None:  # torch's SummaryWriter needs it
        raise local_error("--tensorboard needs the tensorboard package: pip install -r requirements-extras.txt")
    outputs.claim(log_dir, "--tensorboard", outputs.TENSORBOARD_DIR, overwrite, inputs)
    check_writable(log_dir, "--tensorboard")


def run_tokenizer(data: str) -> dict | None:
    """The record of the run's tokenizer that every checkpoint carries (checkpoint.SaveTarget); None
    for token files whose meta.json names none."""
    try:
        tok = load_tokenizer(data)
    except DataError:
        return None
    record = {"name": "bytes" if tok.name == "bytes" else "tokenizer.json", "eos_id": tok.eos_id, "bos_id": tok.bos_id}
    if tok.name != "bytes":
        with open(tok.name, "rb") as f:
            record.update(path=os.path.abspath(tok.name), sha256=hashlib.sha256(f.read()).hexdigest())
    return record


def claim_outputs(tc: TrainConfig, resume: ckpt_io.Checkpoint | None, rank: int) -> ckpt_io.SaveTarget | None:
    """Every output of the run checked against the ownership rules (outputs.py) before anything is
    written; return where and as whom checkpoints are saved. Inputs are never outputs: --data is
    read as training text, the checkpoint --load names is read back."""
    inputs = {"--data": tc.data}
    read = dict(inputs, **{"the checkpoint it loads": resume.path}) if resume is not None else inputs
    if tc.metrics_file and rank == 0:
        check_metrics_file(tc.metrics_file, tc.overwrite, read)
    if tc.tensorboard and rank == 0:
        check_tensorboard(tc.tensorboard, tc.overwrite, read)
    if not tc.save:
        return None
    run_id = resume.meta.get("run_id") if resume is not None else None  # a resumed run keeps its id
    run_id = run_id or ckpt_io.new_run_id()
    owned = ckpt_io.claim_save_folder(tc.save, run_id, resume, tc.overwrite, inputs)
    return ckpt_io.SaveTarget(tc.save, run_id, owned, tc.keep_last, run_tokenizer(tc.data))


def launch_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables (or a launch by hand); ConfigError if they
    are not whole numbers or RANK is out of range."""
    env = {k: os.environ.get(k, d) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))}
    launch = " ".join(f"{k}={os.environ.get(k)}" for k in env)
    if not all(v.strip().isdigit() for v in env.values()):
        raise ConfigError(f"{launch} are not a valid launch (whole numbers); use torchrun")
    rank, world_size, local_rank = (int(v) for v in env.values())
    if not 0 <= rank < world_size:
        raise ConfigError(f"{launch}: RANK must be in [0, WORLD_SIZE); use torchrun")
    return rank, world_size, local_rank


def check_master_env(world_size: int) -> None:
    """A multi-rank launch needs rank 0's address: checked just before the rendezvous (after the flags,
    so a bad layout is still reported by a rank started alone), not found missing as a traceback."""
    port = os.environ.get("MASTER_PORT", "")
    if not os.environ.get("MASTER_ADDR") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"WORLD_SIZE={world_size} needs MASTER_ADDR and MASTER_PORT (1-65535) of rank 0, got "
                          f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}; "
                          f"use torchrun, which sets them")


# ================================================================== --dry-run
def dry_run(mc: ModelConfig, tc: TrainConfig, world_size: int) -> None:
    """--dry-run: check the flags and layout of a launch of `world_size` ranks as that launch
    would (the same validate), then print its memory plan. One process, no process group, no
    data or checkpoint read (the vocabulary is --vocab-size), each stage built on the meta device."""
    try:
        tc.validate()
        layout = resolve_layout(mc, tc, world_size)
    except ConfigError as e:
        fail(str(e), True)
    tc = dataclasses.replace(tc, expert_parallel_size=layout.ep)
    device_type = "cpu" if tc.device == "cpu" else "cuda"  # a plan is for the machines of the launch
    bf16 = resolve_param_dtype(tc, torch.device(device_type)) == torch.bfloat16
    print(describe_plan(mc, layout, device_type, bf16, distributed=tc.use_distributed_optimizer,
                        recompute=tc.recompute))
    print("\n".join(config_lines(mc, tc)))


# ======================================================== the inputs of a run
@dataclass
class RunInputs:
    """What the start-up checks produce: the resolved configs, the data and the checkpoint to resume."""

    mc: ModelConfig
    tc: TrainConfig
    layout: Layout
    corpus: Corpus
    resume: ckpt_io.Checkpoint | None
    save_lock: Any  # the open lock file of --save (rank 0), held until the run ends
    notes: list[str]  # what rank 0 says at start about a resumed run (schedule, batch, fresh optimizer)
    target: ckpt_io.SaveTarget | None  # where and as whom checkpoints are saved (None: no --save)


def prepare_inputs(mc: ModelConfig, tc: TrainConfig, given: set[str], rank: int, world_size: int,
                   local_rank: int) -> RunInputs:
    """Every check that needs no communication: flags, checkpoint, data, layout, memory, --save.

    Raises ConfigError; reads the whole checkpoint, so a bad one fails here."""
    try:
        return checked_inputs(mc, tc, given, rank, world_size, local_rank)
    except (DataError, ckpt_io.CheckpointError, NotEnoughMemory, outputs.OutputError) as e:  # this rank's files or machine
        raise local_error(str(e)) from None


def checked_inputs(mc: ModelConfig, tc: TrainConfig, given: set[str], rank: int, world_size: int,
                   local_rank: int) -> RunInputs:
    if not tc.load and tc.save and os.path.isdir(tc.save):
        if os.path.lexists(os.path.join(tc.save, "latest")):
            # auto-resume: a restarted run (torchrun --max-restarts) continues by itself
            tc = dataclasses.replace(tc, load=tc.save)
        elif ckpt_io.list_checkpoints(tc.save):
            raise local_error(f"--save {tc.save} holds checkpoints {ckpt_io.list_checkpoints(tc.save)[-3:]} but no "
                              f"`latest`; resume one with --load {tc.save}/step_N, or choose another folder")
    resume, notes = None, []
    if tc.load:
        resume = ckpt_io.read_checkpoint(tc.load)
        mc = model_config_from_checkpoint(resume.meta["model"], mc, given, f"{resume.path}/meta.json")
        tc, notes = continue_saved_run(tc, resume, given, world_size)
    tc.validate()  # before the data: --seed and the sizes must be sane to read batches
    schedule = tc.schedule()  # the defaults resolved, so the printed and saved config say what runs
    tc = dataclasses.replace(tc, warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps)
    corpus = load_corpus(tc.data, mc.vocab_size if "vocab_size" in given or resume else None)
    if (resume or "vocab_size" in given) and corpus.vocab_size != mc.vocab_size:
        raise local_error(f"--data {tc.data or '(built-in)'} has vocab {corpus.vocab_size}, "
                              + (f"the checkpoint's model {mc.vocab_size}" if resume else
                                 f"--vocab-size says {mc.vocab_size}; drop the flag"))
    mc = dataclasses.replace(mc, vocab_size=corpus.vocab_size)
    layout = resolve_layout(mc, tc, world_size, rank)
    tc = dataclasses.replace(tc, expert_parallel_size=layout.ep)  # saved resolved: 0 would mean "the TP size"
    if tc.sample_interval:  # the prompt in the run's tokenizer: refused now, not at the first sample
        try:
            run_prompt(tc.data, tc.sample_prompt, mc.vocab_size, mc.seq_length)
        except ValueError as e:
            raise local_error(str(e)) from None
    if min(len(corpus.train), len(corpus.val)) < mc.seq_length + 2:
        raise local_error(f"data too short: {len(corpus.train)} train / {len(corpus.val)} val tokens, "
                              f"need more than --seq-length {mc.seq_length} + 1 in each split")
    if uses_cuda(tc) and local_rank >= torch.cuda.device_count():
        raise local_error(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                              f"launch at most that many processes per node")
    device_type = "cuda" if uses_cuda(tc) else "cpu"
    check_memory(mc, layout, local_rank, device_type, resolve_param_dtype(tc, torch.device(device_type)) == torch.bfloat16,
                 distributed=tc.use_distributed_optimizer, recompute=tc.recompute)
    target = claim_outputs(tc, resume, rank)
    save_lock = None
    if tc.save:
        check_writable(tc.save)
        if rank == 0:
            save_lock = ckpt_io.acquire_save_lock(tc.save)
    return RunInputs(mc, tc, layout, corpus, resume, save_lock, notes, target)


# ============================================================== stop handling
class StopRequest:
    """SIGTERM (what SLURM and Kubernetes send before a kill) or SIGINT asks the run to stop after
    the current step, saving a checkpoint; a second SIGINT stops at once.

    The handler only sets a flag; ranks agree on it after every step (one all-reduce), so all
    stop after the same step even when the signal reaches them at different moments. It also
    arms an alarm of `grace` seconds (--dist-timeout): a rank stuck outside a collective (which
    would time out by itself), e.g. in a hung kernel, ends then instead of holding the launcher."""

    def __init__(self, grace: float) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.grace = grace

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.alarm(math.ceil(self.grace))  # SIGALRM's default action ends the process; restore() disarms it
        if signum == signal.SIGINT:  # Ctrl-C twice: the default behaviour, at once
            signal.signal(signum, self.previous[signum])

    def restore(self) -> None:
        signal.alarm(0)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, world_size: int) -> bool:
        flag = torch.tensor([0 if self.signum is None else 1])
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=None)  # did any rank get a signal? (CPU backend)
        return bool(flag.item())


# ======================================================= device and precision
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


# ================================================================= the banner
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


def wrapped(line: str) -> list[str]:
    """A banner line wrapped at spaces to LINE_WIDTH, continued with an indent (a long path stays whole)."""
    return textwrap.wrap(line, LINE_WIDTH, subsequent_indent="    ", break_long_words=False,
                         break_on_hyphens=False) or [line]


def ranges_text(numbers: list[int]) -> str:
    """[0, 1, 2, 3, 6] -> '0-3, 6': a layer list that stays short for a deep model."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def config_flags(mc: ModelConfig, tc: TrainConfig) -> list[str]:
    """The resolved config as the flags whose value differs from its default (`--max-steps 30`,
    `--no-progress`): with the defaults of --help that is the whole config, pasteable, and short."""
    flags = []
    for config in (mc, tc):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if value == f.default:
                continue
            name = f.name.replace("_", "-")
            if field_kind(f) is bool:
                flags.append(f"--{name}" if value else f"--no-{name}")
            else:
                flags.append(f"--{name} {shlex.quote(str(value))}")
    return flags


def config_lines(mc: ModelConfig, tc: TrainConfig, where: str = "") -> list[str]:
    """The resolved config's non-default flags, wrapped between flags (a flag and its value stay on one line)."""
    lines = [f"config: the flags not at their --help default{where}:"]
    for flag in config_flags(mc, tc):
        if len(lines) > 1 and len(lines[-1]) + 1 + len(flag) <= LINE_WIDTH:
            lines[-1] += " " + flag
        else:
            lines.append("  " + flag)
    return lines


def banner_head(inputs: RunInputs, device: torch.device, autocast_dtype: torch.dtype | None) -> list[str]:
    """What a training run and --eval-only both say first: device, precision, software, the model, the data."""
    mc, tc, corpus, layout = inputs.mc, inputs.tc, inputs.corpus, inputs.layout
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        "no CUDA device visible" if tc.device == "auto" else "--device cpu")
    weights = resolve_param_dtype(tc, device)
    precision = "fp32" if weights == torch.float32 else "bf16 with fp32 master weights"
    experts = (f"{mc.num_experts} experts top-{mc.num_experts_per_token} in layers {ranges_text(mc.moe_layers)}"
               if mc.num_experts else "dense")
    if mc.mtp_num_layers:
        experts += f" | {mc.mtp_num_layers} MTP modules (layers {mc.mtp_layers}), loss coef {tc.mtp_loss_coef:g}"
    return [f"device: {device.type} ({where}) x {layout.world_size} rank{'s' if layout.world_size > 1 else ''} | "
            f"weights {precision} | autocast {autocast_dtype or 'off'} | grouped GEMM "
            f"{can_use_grouped_mm(device, mc, autocast_dtype or torch.float32)}",
            f"software: {software_text()}",
            f"model: {params_per_stage(mc, 1, 1, 1)[0]:,} parameters, {mc.active_params_per_token():,} active per "
            f"token (embedding lookup excluded)",
            f"  {mc.num_layers} layers, hidden {mc.hidden_size}, {experts}",
            f"data: {corpus.description}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens"]


def print_banner(inputs: RunInputs, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
    """What is about to run, before anything is allocated: device and precision, model size,
    layout, data, batch and schedule, the memory estimate, notes on a resume, the flags that differ
    from the defaults. --eval-only says only what its number depends on: model, data, eval batches."""
    mc, tc, layout = inputs.mc, inputs.tc, inputs.layout
    head = banner_head(inputs, device, autocast_dtype)
    if tc.eval_only:
        lines = ["=" * 28 + " eval " + "=" * 28] + head + [
            f"eval: {tc.eval_iters} batches of {layout.global_batch} sequences x {mc.seq_length} tokens of the val "
            f"split (seed {tc.seed})"]
        print("\n".join(part for line in lines for part in wrapped(line)))
        return
    ranks = describe_layout(layout, mc).split("\n")
    ranks = ranks[:17] + ([f"  ... {len(ranks) - 17} more ranks"] if len(ranks) > 17 else [])
    weights = resolve_param_dtype(tc, device)
    state, acts = estimate_rank_bytes(mc, layout, weights == torch.bfloat16, device.type == "cuda",
                                      distributed=tc.use_distributed_optimizer, recompute=tc.recompute)
    optim_bytes = optimizer_bytes_per_rank(mc, layout, weights == torch.bfloat16, tc.use_distributed_optimizer)
    if not tc.use_distributed_optimizer:
        sharding = "whole on each rank; --use-distributed-optimizer shards it over DP"
    elif layout.dp == 1:
        sharding = "--use-distributed-optimizer changes nothing at DP 1: no replica to share it with"
    else:
        sharding = (f"--use-distributed-optimizer: dense weights' state / DP {layout.dp}, experts' / their "
                    f"{layout.expert_dp_size} replica{'s' if layout.expert_dp_size > 1 else ''}")
    where = " (each checkpoint's meta.json holds the whole config)" if tc.save else ""
    lines = (["=" * 28 + " run " + "=" * 28] + head[:4] + ranks + head[4:] + [
        f"batch: {layout.global_batch} sequences x {mc.seq_length} tokens per step ({tc.micro_batch_size} per "
        f"micro-batch x {tc.num_microbatches} micro-batches x DP {layout.dp}), {tc.max_steps} steps",
        f"optimizer: {tc.optimizer} | LR: {tc.schedule().describe()}",
        f"memory per rank (estimate): {size_text(state)} weights, gradients and optimizer state + at least "
        f"{size_text(acts)} activations",
        f"optimizer state per rank (estimate): {size_text(optim_bytes)} ({sharding})"]
        + [f"note: {note}" for note in inputs.notes] + config_lines(mc, tc, where))
    print("\n".join(part for line in lines for part in wrapped(line)))
