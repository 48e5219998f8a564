"""``python -m cabb_ray.report``: the ablation table and size-bin plot (checked against the
MLflow runs of a real two-variant search), the early-stopping fidelity check, bad input."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cabb_ray.errors import CabbRayError, run_cli
from cabb_ray.report.ablation import (
    SIZE_BINS,
    ablation_table,
    comparison_markdown,
    comparison_table,
    markdown,
    size_bin_table,
)
from cabb_ray.report.cli import main as report_main
from cabb_ray.report.fidelity import fidelity_table, trusted_epoch, verdict
from cabb_ray.report.source import SearchRecord, Trial
from tests.search_helpers import TINY_FIXED, children, common_args, tiny_space


class FakeRecord(SearchRecord):
    """A search without MLflow: histories from a dict {run_id: {key: [(step, value)]}}."""

    histories: dict

    def history(self, run_id, key):
        return self.histories[run_id].get(key, [])


def record(trials, tags=None, histories=None) -> FakeRecord:
    fake = FakeRecord("sqlite:///x.db", "exp", "s", "parent", tags or {}, trials)
    fake.histories = histories or {}
    return fake


def trial(run_id, variant, seed, **metrics) -> Trial:
    return Trial(run_id, run_id, {"variant": variant, "run.seed": seed}, metrics)


def test_table_is_mean_and_sample_std_over_seeds_in_the_files_order():
    fake = record(
        [
            trial("a", "CROP", 0, pq=0.2, map=0.1),
            trial("b", "CROP", 1, pq=0.4, map=0.3),
            trial("c", "FULL", 0, pq=0.5),
        ],
        tags={"search.variants": '["FULL", "CROP", "CROP+CABB"]'},
    )
    table = ablation_table(fake).set_index("variant")
    assert list(table.index) == ["FULL", "CROP", "CROP+CABB"]
    assert table.loc["CROP+CABB", "trials"] == 0  # no finished trial: its row stays, empty
    assert table.loc["CROP", "pq_mean"] == pytest.approx(0.3)
    assert table.loc["CROP", "pq_std"] == pytest.approx(math.sqrt(0.02))  # ddof=1
    assert table.loc["CROP", "seeds"] == "0,1" and table.loc["CROP", "trials"] == 2
    assert math.isnan(table.loc["FULL", "pq_std"]) and math.isnan(table.loc["FULL", "map_mean"])
    text = markdown(table.reset_index(), "t")
    assert "| CROP | 2 | 30.0 ± 14.1 |" in text and "| FULL | 1 | 50.0 | - |" in text


def test_comparisons_are_differences_in_units_of_the_pooled_seed_std():
    """CROP+CABB vs CROP on the over_crop bin: means 0.5 and 0.3, sample stds sqrt(0.02) and
    0 pool to 0.1 (root mean square), so the difference is +2.0 std; pairs with a missing
    variant are left out."""
    fake = record(
        [
            trial("a", "CROP", 0, box_map_over_crop=0.3, things_over_crop=40.0, box_map=0.2),
            trial("b", "CROP", 1, box_map_over_crop=0.3, things_over_crop=40.0, box_map=0.4),
            trial("c", "CROP+CABB", 0, box_map_over_crop=0.4, box_map=0.3),
            trial("d", "CROP+CABB", 1, box_map_over_crop=0.6, box_map=0.3),
        ],
        tags={"search.variants": '["FULL", "CROP", "CROP+CABB"]'},
    )
    table = comparison_table(fake)
    assert set(table["comparison"]) == {"CROP+CABB vs CROP"}  # no FULL trial, no ISUS rows
    row = table[(table["kind"] == "box") & (table["bin"] == "over_crop")].iloc[0]
    assert row["diff"] == pytest.approx(0.2) and row["seed_std"] == pytest.approx(0.1)
    assert row["diff_in_std"] == pytest.approx(2.0) and row["things"] == 40
    overall = table[(table["kind"] == "box") & (table["bin"] == "all")].iloc[0]
    assert overall["diff"] == pytest.approx(0.0)
    assert overall["seed_std"] == pytest.approx(0.1)
    text = comparison_markdown(table)
    assert "| box | over_crop | 40 | 50.0 | 30.0 | +20.0 | 10.0 | +2.0 |" in text


def test_size_bins_hold_box_and_mask_ap_per_bin():
    fake = record(
        [
            trial("a", "CROP", 0, **{"box_map_p99-100": 0.1, "map_p99-100": 0.2}),
            trial("b", "CROP", 1, **{"box_map_p99-100": 0.3, "map_p99-100": 0.4}),
        ]
    )
    bins = size_bin_table(fake)
    assert len(bins) == 2 * len(SIZE_BINS)
    row = bins[(bins["kind"] == "box") & (bins["bin"] == "p99-100")].iloc[0]
    assert row["mean"] == pytest.approx(0.2) and row["trials"] == 2
    row = bins[(bins["kind"] == "mask") & (bins["bin"] == "p99-100")].iloc[0]
    assert row["mean"] == pytest.approx(0.3)


def test_ablation_needs_variants():
    fake = record([Trial("a", "a", {"optim.lr": 0.1}, {"pq": 0.1})])
    with pytest.raises(CabbRayError, match="have no 'variant'"):
        ablation_table(fake)


def _curves(per_trial: dict[str, list[float]]) -> dict:
    """PQ per epoch logged at steps 10, 20, ... with the epoch beside it, as training logs."""
    return {
        run: {
            "pq": [(10 * e, v) for e, v in enumerate(values, 1)],
            "epoch": [(10 * e, float(e)) for e in range(1, len(values) + 1)],
        }
        for run, values in per_trial.items()
    }


def test_fidelity_tau_per_epoch_and_trusted_epoch():
    # final order a < b < c < d; epoch 1 reversed, epoch 2 one swap, epoch 3 the final order
    curves = {
        "a": [0.4, 0.2, 0.1, 0.1],
        "b": [0.3, 0.1, 0.2, 0.2],
        "c": [0.2, 0.3, 0.3, 0.3],
        "d": [0.1, 0.4, 0.4, 0.4],
    }
    fake = record(
        [Trial(r, r, {}, {}) for r in curves],
        tags={"search.scheduler": "none"},
        histories=_curves(curves),
    )
    table = fidelity_table(fake)
    assert list(table["epoch"]) == [1, 2, 3, 4] and list(table["trials"]) == [4, 4, 4, 4]
    assert table["tau"].tolist() == pytest.approx([-1.0, 4 / 6, 1.0, 1.0])
    assert trusted_epoch(table, 0.6) == 2 and trusted_epoch(table, 0.9) == 3
    assert "from epoch 2 of 4" in verdict(table, 0.6)
    flat = pd.DataFrame({"epoch": [1, 2], "tau": [math.nan, math.nan]})
    assert "cannot be ranked" in verdict(flat, 0.6)
    never = pd.DataFrame({"epoch": [1, 2], "tau": [0.1, 1.0]})
    assert trusted_epoch(never, 0.6) is None and "no epoch before the last" in verdict(never, 0.6)


def test_fidelity_refuses_early_stopped_or_sparse_searches():
    curves = _curves({r: [0.1, 0.2] for r in "abc"})
    trials = [Trial(r, r, {}, {}) for r in "abc"]
    with pytest.raises(CabbRayError, match="ran with early stopping"):
        fidelity_table(record(trials, {"search.scheduler": '{"type": "asha"}'}, curves))
    with pytest.raises(CabbRayError, match="needs at least 3"):
        fidelity_table(record(trials[:2], {"search.scheduler": "none"}, curves))
    once = {r: {"pq": [(10, 0.1)], "epoch": [(10, 2.0)]} for r in "abc"}
    with pytest.raises(CabbRayError, match="fewer than two epochs"):
        fidelity_table(record(trials, {"search.scheduler": "none"}, once))


def _report(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(report_main, argv)
    return info.value.code, capsys.readouterr()


def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = _report(["--experiment", "x", "--tau", "2"], capsys)
    assert code == 2 and "--tau 2.0: expected a value in -1..1" in out.err
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    code, out = _report(["--experiment", "x", "--mlflow-uri", missing], capsys)
    assert code == 2 and "no such database file" in out.err
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).create_experiment("other")
    code, out = _report(["--experiment", "abl", "--mlflow-uri", uri], capsys)
    assert code == 2 and "--experiment abl: no such experiment" in out.err and "other" in out.err
    code, out = _report(["--experiment", "other", "--mlflow-uri", uri], capsys)
    assert code == 2 and "--experiment other: holds no search" in out.err
    assert len(out.err.strip().splitlines()) == 1


@pytest.mark.integration
def test_two_variant_ablation_end_to_end(local_ray, tmp_path, monkeypatch, capsys):
    """A real search over two variants x one seed, then the report: every table cell and every
    plotted bar equals the MLflow child runs' metrics, and the files reach the parent run."""
    from cabb_ray.tune.cli import main as tune_main

    monkeypatch.chdir(tmp_path)
    space = tiny_space(
        tmp_path,
        "abl",
        searcher={"type": "grid", "seed": 0},
        scheduler="none",
        fixed={**TINY_FIXED, "data.cache_dir": str(tmp_path / "cache"), "eval.every": 1},
        variants={
            "CROP": {"data.sampler": "cus", "loss.cabb_rpn": False, "loss.cabb_roi": False},
            "CROP+CABB": {"data.sampler": "cus", "loss.cabb_rpn": True, "loss.cabb_roi": True},
        },
        space={"variant": {"grid": ["CROP", "CROP+CABB"]}, "run.seed": {"grid": [3]}},
    )
    assert tune_main(["--space", str(space), "--name", "ab1", *common_args(tmp_path)]) == 0
    client, parents, kids = children(tmp_path, "abl")
    assert sorted(k.data.tags["cabb_ray.variant"] for k in kids) == ["CROP", "CROP+CABB"]
    for kid in kids:
        params = kid.data.params
        cabb = kid.data.tags["cabb_ray.variant"] == "CROP+CABB"
        assert params["loss.cabb_rpn"] == str(cabb) and params["run.seed"] == "3"
    capsys.readouterr()

    out = tmp_path / "report"
    uri = common_args(tmp_path)[-1]
    code, printed = _report(["--experiment", "abl", "--mlflow-uri", uri, "--out", str(out)], capsys)
    assert code == 0, printed.err
    assert "| variant | n | PQ |" in printed.out
    table = pd.read_csv(out / "ablation.csv").set_index("variant")
    bins = pd.read_csv(out / "size_bins.csv")
    assert list(table.index) == ["CROP", "CROP+CABB"]  # the file's order
    for kid in kids:
        variant = kid.data.tags["cabb_ray.variant"]
        # the final evaluation's figures, read at its step (NaN where none was logged there)
        last = max(m.step for m in client.get_metric_history(kid.info.run_id, "epoch"))
        metrics = {
            key: next(
                (
                    m.value
                    for m in client.get_metric_history(kid.info.run_id, key)
                    if m.step == last
                ),
                math.nan,
            )
            for key in kid.data.metrics
        }
        assert table.loc[variant, "trials"] == 1 and str(table.loc[variant, "seeds"]) == "3"
        for key in ("pq", "pq_th", "pq_st", "map", "box_map", "miou", "pc", "pq_dagger"):
            assert table.loc[variant, f"{key}_mean"] == pytest.approx(metrics[key], nan_ok=True)
        for kind, prefix in (("box", "box_map_"), ("mask", "map_")):
            for name in SIZE_BINS:
                row = bins[(bins["variant"] == variant) & (bins["kind"] == kind)]
                value = row[row["bin"] == name]["mean"].iloc[0]
                assert value == pytest.approx(metrics.get(prefix + name, math.nan), nan_ok=True)
    assert (out / "size_bins.png").stat().st_size > 10_000
    compared = pd.read_csv(out / "comparisons.csv")
    crop = next(k for k in kids if k.data.tags["cabb_ray.variant"] == "CROP")
    for name in SIZE_BINS:  # ground-truth counts come from the runs, for every bin
        things = compared[(compared["kind"] == "box") & (compared["bin"] == name)]["things"]
        assert things.iloc[0] == crop.data.metrics[f"things_{name}"]
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {f"report/{n}" for n in ("ablation.md", "size_bins.png", "size_bins.csv")} <= logged

    # two trials are too few to rank: the fidelity check says so in one line
    code, printed = _report(["--experiment", "abl", "--mlflow-uri", uri, "--fidelity"], capsys)
    assert code == 2 and "needs at least 3" in printed.err
