"""Every picture the project draws, in one place: overlays of predictions and crops (PIL), and
the matplotlib figures of the data, the evaluations, the reports and the search.

Importable without torch; matplotlib (Agg, no display), pandas and Optuna are imported inside
the functions that draw with them, so predict and the data loader do not pay for them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from matplotlib.figure import Figure

BOX = (40, 220, 60)  # crop preview: instance boxes
CUT = (235, 30, 30)  # crop preview: cut sides
# the size-bin figure's panels: (kind, metric prefix) of box and mask AP per size bin
AP_KINDS = (("box", "box_map_"), ("mask", "map_"))


# ------------------------------------------------------------------ overlays (PIL / numpy)
def category_colors(categories: list[dict]) -> dict[int, list[int]]:
    """Category id to its RGB colour (Cityscapes colours; grey where a category has none)."""
    return {int(c["id"]): c.get("color", [128, 128, 128]) for c in categories}


def overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict], colors: dict) -> np.ndarray:
    """Category colours blended over the image, with white segment borders."""
    out = image.astype(np.float32).copy()
    for seg in segments:
        mask = ids == seg["id"]
        out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colors[seg["category_id"]], np.float32)
    border = np.zeros(ids.shape, dtype=bool)
    border[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    border[1:, :] |= ids[1:, :] != ids[:-1, :]
    out[border] = 255
    return out.clip(0, 255).astype(np.uint8)


def render_crop(sample: dict[str, Any]) -> Image.Image:
    """One training crop (a CropDataset sample) with masks tinted, boxes in green and cut
    sides redrawn thick in red: what the CABB loss is told about each box."""
    image = (sample["image"].permute(1, 2, 0).numpy() * 255).astype(np.float32)
    target = sample["target"]
    rng = np.random.default_rng(0)
    for mask in target["masks"].numpy().astype(bool):
        colour = rng.uniform(60, 255, 3)
        image[mask] = 0.5 * image[mask] + 0.5 * colour
    canvas = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for box, cut in zip(target["boxes"].tolist(), target["cut"].tolist(), strict=True):
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX, width=1)
        sides = [
            ((x0, y0), (x0, y1 - 1)),
            ((x0, y0), (x1 - 1, y0)),
            ((x1 - 1, y0), (x1 - 1, y1 - 1)),
            ((x0, y1 - 1), (x1 - 1, y1 - 1)),
        ]
        for is_cut, side in zip(cut, sides, strict=True):
            if is_cut:
                draw.line(side, fill=CUT, width=3)
    return canvas


# ------------------------------------------------------------------ matplotlib figures
def _pyplot():
    """pyplot on the Agg backend: figures are written to files, also on headless nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: str | Path) -> Path:
    """Lay out, write at 100 dpi and close (pyplot keeps open figures alive)."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def size_histogram(side: np.ndarray, title: str, path: str | Path) -> Path:
    """Histogram of thing sqrt(area) on log bins (``python -m cabb_ray.data stats --plot``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(side, bins=np.geomspace(max(side.min(), 1), side.max(), 30))
    ax.set_xscale("log")
    ax.set_xlabel("sqrt(instance area) [px]")
    ax.set_ylabel("thing instances")
    ax.set_title(title)
    return _save(fig, path)


def size_bins_of(metrics: dict[str, float], label: str = "this evaluation") -> pd.DataFrame:
    """One evaluation's box and mask AP per size bin, as the long table size_bin_plot draws
    (one variant, no spread)."""
    import pandas as pd

    names = [k[len("map_") :] for k in metrics if k.startswith("map_")]  # map_<bin> only
    rows = [
        {
            "variant": label,
            "kind": kind,
            "bin": name,
            "mean": metrics.get(prefix + name, math.nan),
            "std": math.nan,
            "trials": 1,
        }
        for kind, prefix in AP_KINDS
        for name in names
    ]
    return pd.DataFrame(rows, columns=["variant", "kind", "bin", "mean", "std", "trials"])


def _bin_label(name: str) -> str:
    """Percentile bins are p<lo>-<hi>; the one absolute bin holds things larger than the crop."""
    return f"{name[1:]}%" if name.startswith("p") else "> crop"


def size_bin_plot(bins: pd.DataFrame, path: str | Path, title: str = "AP by instance size") -> Path:
    """The CABB paper's Fig. 5: grouped bars of AP per size-percentile bin, one colour per
    variant, error bars one std over seeds where there is a spread; box AP left, mask AP right.

    ``bins`` is the long table of report.ablation.size_bin_table (or size_bins_of for one
    evaluation): variant, kind, bin, mean, std, trials. Variants without a finished trial are
    left out; a bin with no value is drawn at 0.
    """
    plt = _pyplot()
    variants = list(dict.fromkeys(bins[bins["trials"] > 0]["variant"]))
    names = list(dict.fromkeys(bins["bin"]))
    fig, axes = plt.subplots(1, len(AP_KINDS), figsize=(12, 4), sharey=True)
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(names))
    colors = plt.get_cmap("tab10")
    for ax, (kind, _) in zip(axes, AP_KINDS, strict=True):
        for k, variant in enumerate(variants):
            part = bins[(bins["variant"] == variant) & (bins["kind"] == kind)].set_index("bin")
            means = np.array([100 * part.loc[b, "mean"] for b in names], dtype=float)
            stds = np.array([100 * part.loc[b, "std"] for b in names], dtype=float)
            ax.bar(
                x + (k - (len(variants) - 1) / 2) * width,
                np.nan_to_num(means),
                width,
                yerr=None if np.isnan(stds).all() else np.nan_to_num(stds),
                capsize=2,
                color=colors(k % 10),
                label=variant,
            )
        ax.set_xticks(x, [_bin_label(b) for b in names])
        ax.set_xlabel("GT instance area percentile bin, then things larger than the crop")
        ax.set_title(f"{kind} AP by instance size")
    axes[0].set_ylabel("AP (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def fidelity_plot(table: pd.DataFrame, threshold: float, path: str | Path, title: str) -> Path:
    """Kendall tau per epoch (report.fidelity.fidelity_table) against the trusted level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(table["epoch"], table["tau"], "o-", color="#36a", label="Kendall tau")
    ax.axhline(threshold, color="#c33", linestyle="--", label=f"trusted (tau >= {threshold:g})")
    ax.set_xticks(table["epoch"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("tau(PQ at epoch, final PQ)")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_axes(study: optuna.Study, target_names: list[str]) -> Any:
    """Optuna's own Pareto-front plot of a two- or three-objective study, the front's trials
    annotated with their user attr ``trial`` where they have one (tune.leaderboard's
    objective_study sets it to the Tune trial id; a loaded study's trials have none). Returns
    the matplotlib axes (the notebook shows them inline, so the backend is left as it is)."""
    import optuna
    from optuna.visualization.matplotlib import plot_pareto_front

    with warnings.catch_warnings():  # optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(study, target_names=target_names)
    if len(target_names) == 2:
        for trial in study.best_trials:
            if "trial" in trial.user_attrs:
                ax.annotate(str(trial.user_attrs["trial"]), tuple(trial.values), fontsize=7)
    ax.set_title("search trials: Pareto front")
    return ax


def pareto_plot(study: optuna.Study, path: str | Path, target_names: list[str]) -> Path:
    """pareto_axes, saved as a PNG."""
    _pyplot()
    return _save(pareto_axes(study, target_names).figure, path)
