"""The synthetic dataset checked by an independent reader, plus determinism and size figures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import name2label

from cabb_ray.data.index import read_segment_index
from cabb_ray.data.stats import thing_size_stats
from cabb_ray.data.synthetic import MIN_VISIBLE_SIDE, THING_CLASSES, write_synthetic_dataset
from tests.conftest import SMALL
from tests.independent_reader import read_ids, read_split, segment_stats


def test_every_png_id_matches_segments_info(synthetic_root):
    for split in ("train", "val"):
        data = read_split(synthetic_root, split)
        assert len(data["images"]) == SMALL[f"num_{split}"]
        by_image = {a["image_id"]: a for a in data["annotations"]}
        for image in data["images"]:
            ann = by_image[image["id"]]
            ids = read_ids(synthetic_root / split / ann["file_name"])
            assert ids.shape == (image["height"], image["width"])
            assert (synthetic_root / "images" / split / image["file_name"]).is_file()
            truth = segment_stats(ids)
            listed = {s["id"]: s for s in ann["segments_info"]}
            assert set(truth) == set(listed)
            for seg_id, (area, bbox) in truth.items():
                assert listed[seg_id]["area"] == area
                assert listed[seg_id]["bbox"] == bbox


def test_categories_and_ids_follow_cityscapesscripts(synthetic_root):
    data = read_split(synthetic_root, "train")
    categories = {c["id"]: c for c in data["categories"]}
    for cat in data["categories"]:
        label = name2label[cat["name"]]
        assert cat["id"] == label.trainId
        assert tuple(cat["color"]) == label.color
        assert bool(cat["isthing"]) == label.hasInstances
    names = {c["name"] for c in categories.values()}
    assert {"road", "sidewalk", "building", "vegetation", "sky"} <= names
    assert set(THING_CLASSES) <= names
    assert {"person", "car", "truck", "bus", "bicycle"} <= set(THING_CLASSES)
    for ann in data["annotations"]:
        for seg in ann["segments_info"]:
            label = name2label[categories[seg["category_id"]]["name"]]
            if seg["iscrowd"]:
                assert label.hasInstances and seg["id"] == label.id
            elif label.hasInstances:
                assert seg["id"] // 1000 == label.id
            else:
                assert seg["id"] == label.id


def test_void_and_crowd_regions_occur(synthetic_root):
    data = read_split(synthetic_root, "train")
    crowd = sum(s["iscrowd"] for a in data["annotations"] for s in a["segments_info"])
    assert crowd >= 1
    void = sum(
        int((read_ids(synthetic_root / "train" / a["file_name"]) == 0).sum())
        for a in data["annotations"]
    )
    assert void > 0


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes(synthetic_root, tmp_path):
    again = tmp_path / "again"
    write_synthetic_dataset(again, **SMALL)
    assert _digests(again) == _digests(synthetic_root)
    other = tmp_path / "other"
    write_synthetic_dataset(other, **{**SMALL, "seed": SMALL["seed"] + 1})
    assert _digests(other)["train.json"] != _digests(synthetic_root)["train.json"]


def test_instance_sizes_are_heavy_tailed_above_the_size_floor(tmp_path):
    """At the benchmark's 256x512, as the quickstart trains on them: no thing under the
    visible floor (8 px sqrt(area)), few fragments under 14 px, heavy-tailed sizes (median
    near 30 px, largest ~10x that), and >= 10% of things wider or taller than the 128 px crop,
    so that CABB has work."""
    write_synthetic_dataset(tmp_path, num_train=64, num_val=0, seed=0, height=256, width=512)
    stats = thing_size_stats(tmp_path, "train", crop=128)
    assert stats.sqrt_area_min >= MIN_VISIBLE_SIDE * 256
    sides = np.sqrt(
        [
            r["area"]
            for r in read_segment_index(tmp_path, "train").to_pylist()
            if r["isthing"] and not r["iscrowd"]
        ]
    )
    assert np.mean(sides < 14) <= 0.25, "the size floor keeps most things proposable"
    assert stats.sqrt_area_median < 64, "most instances should be small"
    assert stats.sqrt_area_max >= 8 * stats.sqrt_area_median
    assert stats.frac_larger_than_crop >= 0.10
    assert stats.crowd_segments >= 1


def test_size_floor_scales_with_the_image(tmp_path):
    """The floor is in image heights: at half the benchmark's height it is half as many px."""
    write_synthetic_dataset(tmp_path, num_train=8, num_val=0, seed=0, height=128, width=256)
    stats = thing_size_stats(tmp_path, "train", crop=64)
    assert MIN_VISIBLE_SIDE * 128 <= stats.sqrt_area_min < MIN_VISIBLE_SIDE * 256


def test_parquet_index_matches_json(synthetic_root):
    import pyarrow.parquet as pq

    table = pq.read_table(synthetic_root / "train.segments.parquet").to_pylist()
    data = read_split(synthetic_root, "train")
    things = {c["id"]: bool(c["isthing"]) for c in data["categories"]}
    expected = [
        (str(a["image_id"]), s["id"], s["category_id"], s["area"], [float(v) for v in s["bbox"]])
        for a in data["annotations"]
        for s in a["segments_info"]
    ]
    got = [(r["image_id"], r["segment_id"], r["category_id"], r["area"], r["bbox"]) for r in table]
    assert got == expected
    assert all(r["isthing"] == things[r["category_id"]] for r in table)


@pytest.mark.parametrize("split", ["train"])
def test_images_are_textured_not_flat(synthetic_root, split):
    """No class should be separable by one colour: colours vary *spatially* within segments
    (texture and shading over many pixels), not only by the per-pixel noise. A 7x7 box blur
    leaves about 1/7 of independent pixel noise (std 5 -> 0.7), so what varies after it is
    structure; segments' interiors (eroded by the blur's reach) must still vary."""
    from PIL import Image
    from scipy import ndimage

    data = read_split(synthetic_root, split)
    ann = data["annotations"][0]
    ids = read_ids(synthetic_root / split / ann["file_name"])
    rgb = np.array(Image.open(synthetic_root / "images" / split / data["images"][0]["file_name"]))
    blurred = ndimage.uniform_filter(rgb.astype(float), size=(7, 7, 1))
    checked = 0
    for seg in ann["segments_info"]:
        interior = ndimage.binary_erosion(ids == seg["id"], np.ones((7, 7), bool))
        if interior.sum() > 200:
            checked += 1
            assert blurred[interior].std(axis=0).max() > 2.0, seg
    assert checked >= 3
