"""Plot a --metrics-file: one overview page of the run, and each chart as its own figure.

    python scripts/plot_metrics.py out/metrics.jsonl --out out/plots

Writes into --out: overview.png (every chart below on one page, 1920 x 1200 pixels, with the
expert-load heatmap of the least balanced MoE layer) and, 1200 x 750 pixels each: loss.png (train
loss and lm_loss per logged step, val_loss points), router_losses.png (aux_loss, z_loss), lr.png,
grad_norm.png, throughput.png (tokens/s), load_balance.png (max / mean expert load per MoE layer;
1 is perfect balance), load_cv.png (the load's coefficient of variation per layer; 0 is perfect
balance) and dead_experts.png (experts under 1% of the mean load per layer), with expert
parallelism ep_rank_rows.png (per layer, the most loaded EP rank's rows over the mean rank's:
the straggler the all-to-all waits for) and, per MoE layer L, expert_load_layerL.png: a heatmap of the fraction of
routed tokens each expert received (rows: logged steps, columns: experts; 1/E everywhere is
perfect balance). Runs with a capacity factor also get dropped_fraction.png, and evaluations that
report bits per byte val_bpb.png; without those fields the figures are not drawn. PNGs are stored
with a 256-colour palette (15-50 KB a figure, about 100 KB the overview) so that they can be
committed. Needs matplotlib (requirements-extras.txt). Lines that are not metrics records (a line
cut short by a crash, a record lacking a plotted field) are skipped with one `warning:` line; a
missing file, a folder or FIFO, or a file with no train record at all is one `error:` line, exit 2,
and writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import stat
import sys
from typing import Any, Callable, NoReturn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import outputs  # noqa: E402  (the project's one rule for who owns an output path)

# Inches and dots per inch: 1200 x 750 pixels, so matplotlib's 10-point text is 21 pixels high and
# reads on a laptop screen; the overview is 1920 x 1200 with 17-pixel text.
FIGSIZE, DPI = (8, 5), 150
OVERVIEW_FIGSIZE, OVERVIEW_DPI, OVERVIEW_COLUMNS = (16, 10), 120, 3
TRAIN_FIELDS = ("step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec")


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)  # NaN and Inf plot as gaps


def per_layer(x: object, values: Callable[[object], bool]) -> bool:
    """A dict keyed by MoE layer index ("0", "3", ...) whose values pass `values`."""
    return isinstance(x, dict) and all(k.isdigit() and values(v) for k, v in x.items())


def well_formed(r: object) -> bool:
    """A train record with every plotted field, or an eval record (`step`, `val_loss`); the optional
    fields (`dropped_fraction` per layer, `val_bpb`) are checked when present."""
    if not isinstance(r, dict) or not isinstance(r.get("step"), int) or isinstance(r["step"], bool):
        return False
    if "loss" not in r:
        return is_number(r.get("val_loss")) and is_number(r.get("val_bpb", 0.0))
    return (all(is_number(r.get(k)) for k in TRAIN_FIELDS)
            and per_layer(r.get("expert_load", {}), lambda v: isinstance(v, list) and v and all(map(is_number, v)))
            and per_layer(r.get("dropped_fraction", {}), is_number)
            and all(per_layer(r.get(k, {}), is_number) for k in ("max_over_mean_load", "load_cv", "dead_experts"))
            and per_layer(r.get("ep_rank_rows", {}), lambda v: isinstance(v, list) and v and all(map(is_number, v))))


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


Series = tuple[str, list, list, str]  # (label, steps, values, matplotlib format)


def draw_lines(ax, title: str, ylabel: str, series: list[Series], log_y: bool = False) -> None:
    for label, xs, ys, fmt in series:
        ax.plot(xs, ys, fmt, label=label, markersize=5, linewidth=1.5)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()


def draw_heatmap(ax, layer: str, steps: list[int], loads: list[list[float]]) -> None:
    """Steps x experts image of the load fractions of one MoE layer."""
    num_experts = len(loads[0])
    im = ax.imshow(loads, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower",
                   extent=(-0.5, num_experts - 0.5, steps[0] - 0.5, steps[-1] + 0.5))
    ax.set(title=f"expert load, layer {layer} (uniform = {1 / num_experts:.3f})", xlabel="expert", ylabel="step")
    ax.figure.colorbar(im, ax=ax, label="fraction of routed tokens")


def max_over_mean(load: list[float]) -> float:
    mean = sum(load) / len(load)
    return max(load) / mean if mean > 0 else math.nan


def charts(train: list[dict], evals: list[dict]) -> list[tuple[str, Callable]]:
    """(file name, function drawing the chart on an axes) of every figure the records allow, in
    overview order; the heatmaps are last, the least balanced layer's first."""
    steps = [r["step"] for r in train]

    def col(key: str) -> list[float]:
        return [r[key] for r in train]

    def lines(*args, **kwargs) -> Callable:
        return lambda ax: draw_lines(ax, *args, **kwargs)

    def layer_col(key: str, layer: str, value: Callable) -> tuple[list, list]:
        rows = [r for r in train if layer in r.get(key, {})]
        return [r["step"] for r in rows], [value(r[key][layer]) for r in rows]

    loss = [("loss", steps, col("loss"), "-"), ("lm_loss", steps, col("lm_loss"), "--")]
    if evals:
        loss.append(("val_loss", [r["step"] for r in evals], [r["val_loss"] for r in evals], "o"))
    out = [("loss.png", lines("loss", "nats / token", loss)),
           ("router_losses.png", lines("router losses (before their coefficients)", "loss",
                                       [("aux_loss", steps, col("aux_loss"), "-"), ("z_loss", steps, col("z_loss"), "-")])),
           ("lr.png", lines("learning rate", "lr", [("lr", steps, col("lr"), "-")])),
           ("grad_norm.png", lines("gradient norm (before clipping)", "norm", [("grad_norm", steps, col("grad_norm"), "-")],
                                   log_y=min(col("grad_norm")) > 0)),
           ("throughput.png", lines("throughput", "tokens / s", [("tokens_per_sec", steps, col("tokens_per_sec"), "-")]))]
    bpb = [r for r in evals if "val_bpb" in r]
    if bpb:
        out.append(("val_bpb.png", lines("validation bits per byte", "bits / byte",
                                         [("val_bpb", [r["step"] for r in bpb], [r["val_bpb"] for r in bpb], "o-")])))
    layers = sorted({layer for r in train for layer in r.get("expert_load", {})}, key=int)
    if not layers:  # a dense run
        return out
    balance = {layer: layer_col("expert_load", layer, max_over_mean) for layer in layers}
    out.append(("load_balance.png", lines("max / mean expert load (1 = balanced)", "max / mean",
                                          [(f"layer {layer}", *balance[layer], "-") for layer in layers])))
    if any("load_cv" in r for r in train):  # the load-health fields (runs from before them lack these)
        out.append(("load_cv.png", lines("coefficient of variation of the expert load (0 = balanced)", "std / mean",
                                         [(f"layer {layer}", *layer_col("load_cv", layer, float), "-")
                                          for layer in layers])))
        out.append(("dead_experts.png", lines("dead experts (under 1% of the mean load in the interval)", "experts",
                                              [(f"layer {layer}", *layer_col("dead_experts", layer, float), "-")
                                               for layer in layers])))
    if any("ep_rank_rows" in r for r in train):
        out.append(("ep_rank_rows.png", lines("EP straggler: most loaded EP rank's rows / mean rank's (1 = even)",
                                              "max / mean rows", [(f"layer {layer}", *layer_col("ep_rank_rows", layer,
                                                                                              max_over_mean), "-")
                                                                  for layer in layers])))
    dropped = sorted({layer for r in train for layer in r.get("dropped_fraction", {})}, key=int)
    if dropped:
        out.append(("dropped_fraction.png", lines("dropped fraction (assignments over capacity)", "fraction",
                                                  [(f"layer {layer}", *layer_col("dropped_fraction", layer, float), "-")
                                                   for layer in dropped])))

    def imbalance(layer: str) -> float:
        finite = [x for x in balance[layer][1] if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else 0.0

    for layer in sorted(layers, key=imbalance, reverse=True):
        rows = [r for r in train if layer in r.get("expert_load", {})]
        out.append((f"expert_load_layer{layer}.png",
                    lambda ax, layer=layer, rows=rows: draw_heatmap(ax, layer, [r["step"] for r in rows],
                                                                    [r["expert_load"][layer] for r in rows])))
    return out


def save(fig, path: str) -> None:
    """PNG with a 256-colour palette: a third of the bytes of full colour, the same picture to the eye."""
    from PIL import Image  # a dependency of matplotlib
    fig.canvas.draw()
    rgb = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    rgb.quantize(256).save(path, optimize=True)


def plot_all(metrics: str, out: str) -> list[str]:
    """Write every figure and the overview; return their paths."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    train, evals = read_metrics(metrics)
    if not train:
        raise ValueError(f"{metrics}: no train records (lines with \"loss\"); give a --metrics-file of a run")
    layers = sorted({layer for r in train for layer in r.get("expert_load", {})}, key=int)
    for layer in layers:
        if len({len(r["expert_load"][layer]) for r in train if layer in r.get("expert_load", {})}) > 1:
            raise ValueError(f"{metrics}: the expert_load of layer {layer} changes its number of experts")
    outputs.claim(out, "--out", outputs.PLOT_DIR, inputs={"the metrics file": metrics})
    os.makedirs(out, exist_ok=True)
    todo = charts(train, evals)
    written = []
    for name, draw in todo:
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        draw(ax)
        fig.tight_layout()
        save(fig, os.path.join(out, name))
        plt.close(fig)
        written.append(os.path.join(out, name))
    # One page: every line chart, then the least balanced layer's heatmap (the others have their own files).
    heatmaps = [c for c in todo if c[0].startswith("expert_load_layer")]
    panels = [c for c in todo if c not in heatmaps] + heatmaps[:1]
    rows = -(-len(panels) // OVERVIEW_COLUMNS)
    fig, axes = plt.subplots(rows, OVERVIEW_COLUMNS, figsize=OVERVIEW_FIGSIZE, dpi=OVERVIEW_DPI, squeeze=False)
    for ax, (_, draw) in zip(axes.flat, panels):
        draw(ax)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{os.path.basename(metrics)}: steps {train[0]['step']}-{train[-1]['step']}", fontsize=14)
    fig.tight_layout()
    save(fig, os.path.join(out, "overview.png"))
    plt.close(fig)
    return [os.path.join(out, "overview.png")] + written


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors end like every other bad input: one `error:` line, exit 2; no
    abbreviated flags. (Its own copy of launch.ArgumentParser: this script imports nothing of the trainer.)"""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kw)  # `--o x` is an error, not `--out x`

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("metrics", help="JSON-lines file written by minimal_pretrain.py --metrics-file")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    args = p.parse_args()
    if importlib.util.find_spec("matplotlib") is None:
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
