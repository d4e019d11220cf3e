"""The study's trade-off figure: test quality against trainable parameters, one point per method
(its mean over seeds), with the 95 % interval of that mean as an error bar."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

# How the plot tells the families apart: (family, marker, colour); every other preset is tied,
# each tied preset in a colour of its own.
FAMILIES = {"lora": ("LoRA", "s", "tab:red"), "vera": ("VeRA", "^", "tab:green")}
TIED_FAMILY = ("Tied-LoRA", "o", None)
TIED_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:cyan", "tab:olive")


def plot_tradeoff(
    points: list[dict[str, Any]],
    base: dict[str, Any] | None,
    task: str,
    metrics: list[str],
    path: Path,
) -> None:
    """One panel per metric (`val_loss`: the validation loss, which still separates methods
    where a test metric sits at its floor), x the trainable parameters (log). A point is one
    method, `points[i][metric]` = (mean, low, high): the mean over its seeds, the bar its 95 %
    interval over seeds and questions (validation loss: ± one standard deviation over seeds).
    A point's shape is its family, its colour its preset, its size its rank; the first target
    set is filled, the others hollow; the base model is a dashed line. One legend says all of
    that, so no text crowds the points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FormatStrFormatter, NullFormatter
    except ImportError:
        print(
            f"no {path.name}: matplotlib is missing (pip install matplotlib, or the `bench` extra)"
        )
        return
    presets = list(dict.fromkeys(p["preset"] for p in points))
    target_sets = list(dict.fromkeys(p["targets"] for p in points))
    ranks = sorted({p["rank"] for p in points})
    tied_colours = itertools.cycle(TIED_COLOURS)
    style = {}  # preset -> (legend text, marker, colour)
    for preset in presets:
        family, marker, colour = FAMILIES.get(preset.lower(), TIED_FAMILY)
        if colour is None:
            colour = next(tied_colours)
        text = family if preset.lower() in FAMILIES else f"{preset} ({family})"
        style[preset] = (text, marker, colour)

    def size(rank: int) -> float:  # marker width grows with rank, the smallest rank at 5.5
        return 5.5 * math.sqrt(math.sqrt(rank / ranks[0]))

    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for p in (p for p in points if p.get(metric) is not None):
            _, marker, colour = style[p["preset"]]
            mean, low, high = p[metric]
            face = colour if p["targets"] == target_sets[0] else "none"
            ax.errorbar(p["trainable_parameters"], mean, yerr=[[mean - low], [high - mean]],
                        marker=marker, markersize=size(p["rank"]), markerfacecolor=face,
                        markeredgecolor=colour, ecolor=colour, elinewidth=1, capsize=3,
                        linestyle="none", alpha=0.9)  # fmt: skip
        if base is not None and base.get(metric) is not None:
            ax.axhline(base[metric], color="gray", linestyle="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.08)
        ax.set_xlabel("trainable parameters")
        if metric == "val_loss":  # log: an untrained method's loss would flatten the rest
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        else:  # a percentage, from 0: a metric at its floor should look like one
            ax.set_ylim(bottom=0)
        ax.set_ylabel("validation loss" if metric == "val_loss" else f"{metric} on test (%)")
        ax.grid(alpha=0.3)

    def key(label: str, marker: str = "o", colour: str = "gray", face: str | None = None,
            ms: float = 6.0, line: str = "none") -> Line2D:  # fmt: skip
        return Line2D([], [], marker=marker, color=colour, markerfacecolor=face or colour,
                      markersize=ms, linestyle=line, label=label)  # fmt: skip

    handles = [key(text, marker, colour) for text, marker, colour in style.values()]
    handles += [key(f"rank {k}", ms=size(k)) for k in ranks]
    handles += [
        key(f"on {t}", face="gray" if i == 0 else "none") for i, t in enumerate(target_sets)
    ]
    handles.append(key("base model", marker="", line="--"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{task}: quality vs trainable parameters (mean over seeds, 95 % interval)")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
