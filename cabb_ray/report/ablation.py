"""The ablation's results as the CABB paper shows them: Table 1 (mean +- std over seeds per
variant) and the numbers of Fig. 5 (box and mask AP per ground-truth size-percentile bin per
variant; cabb_ray.viz.size_bin_plot draws it).

Rows are the space file's variants (each trial's sampled ``variant``), in the file's order;
each row aggregates the finished trials of that variant, one per seed (a variant without a
finished trial keeps its row, with n = 0)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd

from cabb_ray.errors import CabbRayError
from cabb_ray.metrics.names import OVER_CROP_BIN, SIZE_PERCENTILES
from cabb_ray.report.source import SearchRecord, Trial
from cabb_ray.viz import AP_KINDS

# (column title, metric key): Table 1's columns, plus box AP (CABB acts on the boxes)
TABLE_COLUMNS = (
    ("PQ", "pq"),
    ("PQ_th", "pq_th"),
    ("PQ_st", "pq_st"),
    ("mAP", "map"),
    ("box AP", "box_map"),
    ("mIoU", "miou"),
    ("PC", "pc"),
    ("PC_th", "pc_th"),
    ("PC_st", "pc_st"),
    ("PQ-dagger", "pq_dagger"),
)
SIZE_BINS = (
    *(f"p{a}-{b}" for a, b in itertools.pairwise(SIZE_PERCENTILES)),
    OVER_CROP_BIN,
)


def variant_order(record: SearchRecord) -> list[str]:
    """The variants in the space file's order (the parent's tag), then any others seen."""
    listed = json.loads(record.parent_tags.get("search.variants", "[]"))
    seen = [t.sampled.get("variant") for t in record.trials]
    if all(v is None for v in seen):
        raise CabbRayError(
            f"search {record.name}: its trials have no 'variant' (an ablation needs a space "
            "file with variants:, e.g. search_spaces/ablation.yaml)"
        )
    return listed + sorted({v for v in seen if v not in listed} - {None})


def by_variant(record: SearchRecord) -> dict[str, list[Trial]]:
    groups: dict[str, list[Trial]] = {v: [] for v in variant_order(record)}
    for trial in record.trials:
        if trial.sampled.get("variant") in groups:
            groups[trial.sampled["variant"]].append(trial)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std


def ablation_table(record: SearchRecord) -> pd.DataFrame:
    """One row per variant: seeds, then <metric>_mean and <metric>_std (sample std)."""
    rows = []
    for variant, trials in by_variant(record).items():
        row: dict[str, object] = {
            "variant": variant,
            "seeds": ",".join(str(t.sampled.get("run.seed", "-")) for t in trials),
            "trials": len(trials),
        }
        for _, key in TABLE_COLUMNS:
            mean, std = _mean_std([t.metrics.get(key, math.nan) for t in trials])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        rows.append(row)
    return pd.DataFrame(rows)


def size_bin_table(record: SearchRecord) -> pd.DataFrame:
    """Long table of the plot's bars: variant, kind (box/mask), bin, mean, std, trials."""
    rows = []
    for variant, trials in by_variant(record).items():
        for kind, prefix in AP_KINDS:
            for name in SIZE_BINS:
                mean, std = _mean_std([t.metrics.get(prefix + name, math.nan) for t in trials])
                rows.append(
                    {
                        "variant": variant,
                        "kind": kind,
                        "bin": name,
                        "mean": mean,
                        "std": std,
                        "trials": len(trials),
                    }
                )
    return pd.DataFrame(rows)


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def markdown(table: pd.DataFrame, title: str) -> str:
    """Table 1 in percent, mean ± std over seeds."""
    head = ["variant", "n", *[label for label, _ in TABLE_COLUMNS]]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        cells = [str(row["variant"]), str(row["trials"])]
        cells += [_pct(row[f"{key}_mean"], row[f"{key}_std"]) for _, key in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Percent; mean ± sample std over seeds (n trials per variant)."]
    return "\n".join(lines) + "\n"


# The paper's questions, where both variants exist: does CABB help crop training, what does
# crop training cost against whole images, and does CABB still help with ISUS
PAPER_COMPARISONS = (
    ("CROP+CABB", "CROP"),
    ("FULL", "CROP"),
    ("CROP+CABB+ISUS", "CROP+ISUS"),
)


def comparison_table(
    record: SearchRecord, pairs: tuple[tuple[str, str], ...] = PAPER_COMPARISONS
) -> pd.DataFrame:
    """Per pair (A, B), kind (box/mask) and bin (``all``, then the size bins): both means,
    A - B, the seed std (sample stds of A and B pooled) and A - B in units of it, the figure
    that says whether a difference is more than seed noise. Pairs missing a variant are left
    out; ``things`` is the bin's ground-truth count (the same validation set for every row)."""
    groups = by_variant(record)
    rows = []
    for a, b in pairs:
        if not (groups.get(a) and groups.get(b)):
            continue
        for kind, prefix in AP_KINDS:
            for name in ("all", *SIZE_BINS):
                key = prefix.rstrip("_") if name == "all" else prefix + name
                mean_a, std_a = _mean_std([t.metrics.get(key, math.nan) for t in groups[a]])
                mean_b, std_b = _mean_std([t.metrics.get(key, math.nan) for t in groups[b]])
                seed_std = math.sqrt((std_a**2 + std_b**2) / 2)
                things = groups[b][0].metrics.get(f"things_{name}", math.nan)
                rows.append(
                    {
                        "comparison": f"{a} vs {b}",
                        "kind": kind,
                        "bin": name,
                        "things": things,
                        "a": mean_a,
                        "b": mean_b,
                        "diff": mean_a - mean_b,
                        "seed_std": seed_std,
                        "diff_in_std": (mean_a - mean_b) / seed_std if seed_std > 0 else math.nan,
                    }
                )
    columns = ["comparison", "kind", "bin", "things", "a", "b", "diff", "seed_std"]
    return pd.DataFrame(rows, columns=[*columns, "diff_in_std"])


def comparison_markdown(table: pd.DataFrame) -> str:
    """One table per comparison, AP in percent; '-' where there is no value."""

    def pct(value: float) -> str:
        return "-" if math.isnan(value) else f"{100 * value:.1f}"

    lines = []
    for comparison, part in table.groupby("comparison", sort=False):
        a, b = comparison.split(" vs ")
        lines += [
            f"### {comparison}",
            "",
            f"| kind | bin | things | {a} | {b} | difference | seed std | difference / std |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, row in part.iterrows():
            things = "-" if math.isnan(row["things"]) else f"{row['things']:.0f}"
            ratio = "-" if math.isnan(row["diff_in_std"]) else f"{row['diff_in_std']:+.1f}"
            diff = "-" if math.isnan(row["diff"]) else f"{100 * row['diff']:+.1f}"
            lines.append(
                f"| {row['kind']} | {row['bin']} | {things} | {pct(row['a'])} | {pct(row['b'])} "
                f"| {diff} | {pct(row['seed_std'])} | {ratio} |"
            )
        lines.append("")
    lines.append(
        "AP in percent, mean over seeds; seed std: the two variants' sample stds pooled; "
        "things: ground-truth instances in the bin."
    )
    return "\n".join(lines) + "\n"
