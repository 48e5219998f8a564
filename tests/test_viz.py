"""The library-backed helpers against brute force (boxes from masks, the Pareto front), and
each figure of cabb_ray.viz written as a PNG."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from cabb_ray.structures.boxes import label_boxes
from cabb_ray.tune.leaderboard import objective_study, pareto_front
from cabb_ray.viz import fidelity_plot, pareto_plot, size_bin_plot, size_bins_of, size_histogram


def brute_xywh(mask: np.ndarray) -> list[int] | None:
    """COCO box of a mask from the list of its pixels (None when empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]


def random_labels(rng: np.random.Generator, top: int) -> np.ndarray:
    """Random label map with label ``top`` absent and label ``top - 1`` one pixel."""
    labels = rng.integers(0, top - 1, size=(rng.integers(1, 40), rng.integers(1, 40)))
    labels[rng.integers(labels.shape[0]), rng.integers(labels.shape[1])] = top - 1
    return labels


def test_label_boxes_match_brute_force_including_absent_and_single_pixel_labels():
    rng = np.random.default_rng(0)
    for _ in range(50):
        top = int(rng.integers(2, 8))
        labels = random_labels(rng, top)
        boxes = label_boxes(labels, top)
        assert boxes == [brute_xywh(labels == k) for k in range(1, top + 1)]
        assert boxes[-1] is None  # absent
        assert boxes[-2][2:] == [1, 1]  # a single pixel: width and height 1
    assert label_boxes(np.zeros((3, 3), np.int64)) == []
    assert label_boxes(np.zeros((0, 5), np.int64), 2) == [None, None]


def test_mask_boxes_match_brute_force_with_exclusive_ends():
    import torch

    from cabb_ray.data.crops import mask_boxes

    rng = np.random.default_rng(1)
    masks = rng.random((20, 17, 23)) < rng.uniform(0.001, 0.3, (20, 1, 1))
    masks[0] = False
    masks[0, 4, 9] = True  # a single pixel
    masks = masks[masks.any(axis=(1, 2))]  # crops keep non-empty masks only
    expected = []
    for mask in masks:
        x, y, w, h = brute_xywh(mask)
        expected.append([x, y, x + w, y + h])
    got = mask_boxes(torch.from_numpy(masks.astype(np.uint8)))
    assert got.dtype == torch.float32 and got.tolist() == expected
    assert got[0].tolist() == [9, 4, 10, 5]
    assert mask_boxes(torch.zeros((0, 4, 4), dtype=torch.uint8)).shape == (0, 4)


def brute_front(values: np.ndarray, modes: list[str]) -> set[int]:
    signed = values * [1.0 if m == "max" else -1.0 for m in modes]
    ok = [i for i, v in enumerate(signed) if not np.isnan(v).any()]
    return {
        i
        for i in ok
        if not any((signed[j] >= signed[i]).all() and (signed[j] > signed[i]).any() for j in ok)
    }


def test_pareto_front_matches_brute_force_with_ties_and_missing_values():
    rng = np.random.default_rng(2)
    for _ in range(30):
        n = int(rng.integers(1, 25))
        values = rng.integers(0, 6, size=(n, 2)).astype(float)  # small ints: many ties
        values[rng.random((n, 2)) < 0.1] = math.nan
        table = pd.DataFrame({"trial": [f"t{i}" for i in range(n)], "a": values[:, 0]})
        table["b"] = values[:, 1]
        for modes in itertools.product(("max", "min"), repeat=2):
            front = pareto_front(table, ["a", "b"], list(modes))
            assert set(front.index) == brute_front(values, list(modes))
            firsts = front["a"].tolist()
            assert firsts == sorted(firsts, reverse=modes[0] == "max")


def test_figures_are_written(tmp_path):
    side = np.random.default_rng(3).lognormal(3, 1, 200)
    assert size_histogram(side, "sizes", tmp_path / "h.png").stat().st_size > 5_000

    metrics = {"map_p0-50": 0.1, "map_p50-100": math.nan, "box_map_p0-50": 0.3, "pq": 0.5}
    bins = size_bins_of(metrics)
    assert list(bins["bin"]) == ["p0-50", "p50-100"] * 2
    box = bins[bins["kind"] == "box"].set_index("bin")["mean"]
    assert box["p0-50"] == 0.3 and math.isnan(box["p50-100"])
    assert size_bin_plot(bins, tmp_path / "bins.png").stat().st_size > 10_000

    table = pd.DataFrame({"epoch": [1, 2, 3], "tau": [0.2, math.nan, 1.0]})
    assert fidelity_plot(table, 0.6, tmp_path / "f.png", "t").stat().st_size > 5_000

    runs = pd.DataFrame({"trial": list("abc"), "pq": [0.5, 0.4, math.nan], "pc": [0.2, 0.6, 0.9]})
    study = objective_study(runs, ["pq", "pc"], ["max", "max"])
    assert len(study.trials) == 2  # the row without pq is no trial
    assert {t.user_attrs["trial"] for t in study.best_trials} == {"a", "b"}
    assert pareto_plot(study, tmp_path / "p.png", ["pq", "pc"]).stat().st_size > 5_000


@pytest.mark.parametrize("n_objectives", [2, 3])
def test_pareto_plot_takes_two_or_three_objectives(tmp_path, n_objectives):
    names = ["pq", "pc", "miou"][:n_objectives]
    rng = np.random.default_rng(4)
    table = pd.DataFrame(rng.random((8, n_objectives)), columns=names)
    table["trial"] = [f"t{i}" for i in range(8)]
    study = objective_study(table, names, ["max"] * n_objectives)
    assert pareto_plot(study, tmp_path / "p.png", names).is_file()
