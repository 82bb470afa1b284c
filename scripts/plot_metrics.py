"""Plot a --metrics-file: losses, router losses, learning rate, gradient norm, throughput, expert load.

    python scripts/plot_metrics.py out/metrics.jsonl --out out/plots

Writes into --out: loss.png (train loss and lm_loss per logged step, val_loss points),
router_losses.png (aux_loss, z_loss), lr.png, grad_norm.png, throughput.png (tokens/s) and, per
MoE layer L, expert_load_layerL.png: a heatmap of the fraction of routed tokens each expert
received (rows: logged steps, columns: experts; 1/E everywhere is perfect balance).
Figures are small (about 25 KB each) so that they can be committed. Needs matplotlib
(requirements-extras.txt). Lines that are not metrics records (a line cut short by a crash, a
record lacking a plotted field) are skipped with one `warning:` line; a missing file, a folder or
FIFO, or a file with no train record at all is one `error:` line, exit 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import NoReturn

FIGSIZE, DPI = (5, 3), 80
TRAIN_FIELDS = ("step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec")


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)  # NaN and Inf plot as gaps


def well_formed(r: object) -> bool:
    """A train record with every plotted field, or an eval record (`step`, `val_loss`)."""
    if not isinstance(r, dict) or not isinstance(r.get("step"), int) or isinstance(r["step"], bool):
        return False
    if "loss" not in r:
        return is_number(r.get("val_loss"))
    load = r.get("expert_load", {})
    return (all(is_number(r.get(k)) for k in TRAIN_FIELDS) and isinstance(load, dict)
            and all(k.isdigit() and isinstance(v, list) and v and all(is_number(x) for x in v)
                    for k, v in load.items()))


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics file; later records of a step replace earlier ones
    (a resumed run appends the steps it repeats). Lines that are not such records (a line cut by a
    crash, another program's output) are skipped with one warning that counts them."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a folder, or a FIFO that would block forever
        raise ValueError(f"{path}: not a regular file; give the file written by --metrics-file")
    train, evals, bad = {}, {}, []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if not well_formed(r):
                bad.append(n)
            elif "loss" in r:
                train[r["step"]] = r
            else:
                evals[r["step"]] = r
    if bad:
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not metrics records (first: line {bad[0]})",
              file=sys.stderr)
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def line_plot(path: str, title: str, ylabel: str, series: list[tuple[str, list, list, str]],
              log_y: bool = False) -> None:
    """One small figure; series are (label, steps, values, matplotlib format)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for label, xs, ys, fmt in series:
        ax.plot(xs, ys, fmt, label=label, markersize=4, linewidth=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_heatmap(path: str, layer: str, steps: list[int], loads: list[list[float]]) -> None:
    """Steps x experts image of the load fractions of one MoE layer."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    num_experts = len(loads[0])
    im = ax.imshow(loads, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower",
                   extent=(-0.5, num_experts - 0.5, steps[0] - 0.5, steps[-1] + 0.5))
    ax.set(title=f"expert load, layer {layer} (uniform = {1 / num_experts:.3f})", xlabel="expert", ylabel="step")
    fig.colorbar(im, ax=ax, label="fraction of routed tokens")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_all(metrics: str, out: str) -> list[str]:
    """Write every figure; return their paths."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    train, evals = read_metrics(metrics)
    if not train:
        raise ValueError(f"{metrics}: no train records (lines with \"loss\"); give a --metrics-file of a run")
    layers = sorted({layer for r in train for layer in r.get("expert_load", {})}, key=int)
    for layer in layers:
        if len({len(r["expert_load"][layer]) for r in train if layer in r.get("expert_load", {})}) > 1:
            raise ValueError(f"{metrics}: the expert_load of layer {layer} changes its number of experts")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a folder")
    os.makedirs(out, exist_ok=True)
    steps = [r["step"] for r in train]

    def col(key: str) -> list[float]:
        return [r[key] for r in train]

    written = []

    def target(name: str) -> str:
        written.append(os.path.join(out, name))
        return written[-1]

    loss = [("loss", steps, col("loss"), "-"), ("lm_loss", steps, col("lm_loss"), "--")]
    if evals:
        loss.append(("val_loss", [r["step"] for r in evals], [r["val_loss"] for r in evals], "o"))
    line_plot(target("loss.png"), "loss", "nats / token", loss)
    line_plot(target("router_losses.png"), "router losses (before their coefficients)", "loss",
              [("aux_loss", steps, col("aux_loss"), "-"), ("z_loss", steps, col("z_loss"), "-")])
    line_plot(target("lr.png"), "learning rate", "lr", [("lr", steps, col("lr"), "-")])
    line_plot(target("grad_norm.png"), "gradient norm (before clipping)", "norm",
              [("grad_norm", steps, col("grad_norm"), "-")], log_y=min(col("grad_norm")) > 0)
    line_plot(target("throughput.png"), "throughput", "tokens / s",
              [("tokens_per_sec", steps, col("tokens_per_sec"), "-")])
    for layer in layers:
        rows = [r for r in train if layer in r.get("expert_load", {})]
        load_heatmap(target(f"expert_load_layer{layer}.png"), layer, [r["step"] for r in rows],
                     [r["expert_load"][layer] for r in rows])
    return written


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors end like every other bad input: one `error:` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("metrics", help="JSON-lines file written by minimal_pretrain.py --metrics-file")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    args = p.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: matplotlib is not installed; pip install -r requirements-extras.txt", file=sys.stderr)
        sys.exit(2)
    try:
        written = plot_all(args.metrics, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
