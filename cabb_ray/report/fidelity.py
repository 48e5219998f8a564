"""How far early stopping can be trusted: the rank correlation (Kendall tau) between each
epoch's PQ and the final PQ over a search's trials.

ASHA stops a trial at a rung when its PQ there ranks low; that is only safe from the epoch on
which rankings agree with the final ones. The check needs a search whose trials all ran to the
end and were evaluated every epoch (``python -m cabb_ray.tune --no-early-stopping
--set eval.every=1``)."""

from __future__ import annotations

import math

import pandas as pd

from cabb_ray.errors import CabbRayError
from cabb_ray.report.source import SearchRecord

MIN_TRIALS = 3


def epoch_values(record: SearchRecord, run_id: str, key: str = "pq") -> dict[int, float]:
    """A trial's evaluated ``key`` per epoch (metrics are logged at global steps, with the
    epoch beside them)."""
    epoch_at = dict(record.history(run_id, "epoch"))
    values = {}
    for step, value in record.history(run_id, key):
        if step in epoch_at and not math.isnan(value):
            values[int(epoch_at[step])] = value
    return values


def fidelity_table(record: SearchRecord, key: str = "pq") -> pd.DataFrame:
    """Per epoch: trials evaluated there, Kendall tau (tau-b) with the final value, p-value."""
    from scipy.stats import kendalltau

    if record.parent_tags.get("search.scheduler", "none") != "none":
        raise CabbRayError(
            f"search {record.name}: ran with early stopping, so trials stopped early have no "
            "final PQ; run the search with --no-early-stopping --set eval.every=1"
        )
    curves = {t.run_id: epoch_values(record, t.run_id, key) for t in record.trials}
    curves = {run: c for run, c in curves.items() if c}
    last = max((max(c) for c in curves.values()), default=0)
    finals = {run: c[last] for run, c in curves.items() if last in c}
    if len(finals) < MIN_TRIALS:
        raise CabbRayError(
            f"search {record.name}: {len(finals)} trial(s) reached epoch {last}; Kendall tau "
            f"needs at least {MIN_TRIALS}"
        )
    rows = []
    for epoch in range(1, last + 1):
        pairs = [(c[epoch], final) for run, final in finals.items() if epoch in (c := curves[run])]
        if len(pairs) < MIN_TRIALS:
            continue
        tau, p_value = kendalltau([a for a, _ in pairs], [b for _, b in pairs])
        rows.append({"epoch": epoch, "trials": len(pairs), "tau": tau, "p_value": p_value})
    if len(rows) < 2:
        raise CabbRayError(
            f"search {record.name}: its trials were evaluated at fewer than two epochs; run it "
            "with --set eval.every=1"
        )
    return pd.DataFrame(rows)


def trusted_epoch(table: pd.DataFrame, threshold: float) -> int | None:
    """The first epoch before the last from which tau stays >= threshold (None if none)."""
    epochs = list(table["epoch"])[:-1]
    taus = list(table["tau"])[:-1]
    for k, epoch in enumerate(epochs):
        if all(t >= threshold for t in taus[k:] if not math.isnan(t)) and not math.isnan(taus[k]):
            return int(epoch)
    return None


def verdict(table: pd.DataFrame, threshold: float) -> str:
    epoch = trusted_epoch(table, threshold)
    last = int(table["epoch"].iloc[-1])
    if table["tau"].isna().all():
        return (
            "the trials cannot be ranked: their PQ is the same at every epoch (tau undefined); "
            "train longer or search wider ranges"
        )
    if epoch is None:
        return (
            f"no epoch before the last ({last}) ranks trials like the final PQ (tau >= "
            f"{threshold:g}): early stopping on this budget would drop good trials; raise the "
            "grace period to the full run or lengthen training"
        )
    return (
        f"rankings agree with the final ones (tau >= {threshold:g}) from epoch {epoch} of {last}: "
        f"a grace period of {epoch} epoch(s) ({100 * epoch / last:.0f}% of training) is safe"
    )
