"""Plot a --metrics-file: losses, router losses, learning rate, gradient norm, throughput, expert load.

    python scripts/plot_metrics.py out/metrics.jsonl --out out/plots

Writes into --out: loss.png (train loss and lm_loss per logged step, val_loss points),
router_losses.png (aux_loss, z_loss), lr.png, grad_norm.png, throughput.png (tokens/s) and, per
MoE layer L, expert_load_layerL.png: a heatmap of the fraction of routed tokens each expert
received (rows: logged steps, columns: experts; 1/E everywhere is perfect balance).
Figures are small (about 25 KB each) so that they can be committed. Needs matplotlib
(requirements-extras.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FIGSIZE, DPI = (5, 3), 80


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics file; later records of a step replace earlier ones
    (a resumed run appends the steps it repeats)."""
    train, evals = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
            if "loss" in r:
                train[r["step"]] = r
            elif "val_loss" in r:
                evals[r["step"]] = r
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
        raise ValueError(f"{metrics}: no train records (lines with \"loss\")")
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
    layers = sorted({layer for r in train for layer in r.get("expert_load", {})}, key=int)
    for layer in layers:
        rows = [r for r in train if layer in r.get("expert_load", {})]
        load_heatmap(target(f"expert_load_layer{layer}.png"), layer, [r["step"] for r in rows],
                     [r["expert_load"][layer] for r in rows])
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e if not isinstance(e, KeyError) else f'{args.metrics}: a train record lacks {e}'}",
              file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
