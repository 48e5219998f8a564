"""Cityscapes import on a tiny fake gtFine/leftImg8bit tree written by the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cabb_ray.data.cityscapes import import_cityscapes
from cabb_ray.data.panoptic_format import load_split
from cabb_ray.errors import CabbRayError
from tests.independent_reader import read_ids, segment_stats

H, W = 24, 48


def _instance_ids(k: int) -> np.ndarray:
    """Label ids as Cityscapes stores them: stuff/crowd = label id, instance = id*1000+k."""
    ids = np.full((H, W), 23, dtype=np.int32)  # sky
    ids[12:, :] = 7  # road
    ids[8:20, 4:14] = 26000 + k  # car instance
    ids[10:22, 30:34] = 24001  # person instance
    ids[14:20, 40:46] = 24  # person crowd
    ids[22:, :] = 1  # ego vehicle: void
    ids[0:2, 0:4] = 0  # unlabeled: void
    return ids


def _fake_cityscapes(root, splits=("train", "val"), cities=("aachen", "bonn")):
    for split in splits:
        for c, city in enumerate(cities):
            stem = f"{city}_00000{c}_000019"
            gt = root / "gtFine" / split / city
            img = root / "leftImg8bit" / split / city
            gt.mkdir(parents=True, exist_ok=True)
            img.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_instance_ids(c).astype(np.uint16)).save(
                gt / f"{stem}_gtFine_instanceIds.png"
            )
            rgb = np.random.default_rng(c).integers(0, 255, (H, W, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(img / f"{stem}_leftImg8bit.png")


def test_import_converts_with_train_ids(tmp_path):
    src, out = tmp_path / "cs", tmp_path / "out"
    _fake_cityscapes(src)
    written = import_cityscapes(src, out)
    assert [p.name for p in written] == ["train.json", "val.json"]
    data = json.loads((out / "train.json").read_text())
    assert len(data["categories"]) == 19
    cats = {c["name"]: c for c in data["categories"]}
    assert cats["car"]["id"] == 13 and cats["car"]["isthing"] == 1 and cats["road"]["id"] == 0
    for image, ann in zip(data["images"], data["annotations"], strict=True):
        linked = out / "images" / "train" / image["file_name"]
        assert linked.is_file()
        ids = read_ids(out / "train" / ann["file_name"])
        truth = segment_stats(ids)
        listed = {s["id"]: s for s in ann["segments_info"]}
        assert set(truth) == set(listed) == {23, 7, 26000 + int(image["id"][-8]), 24001, 24}
        for seg_id, (area, bbox) in truth.items():
            assert (listed[seg_id]["area"], listed[seg_id]["bbox"]) == (area, bbox)
        assert listed[24]["iscrowd"] == 1 and listed[24001]["iscrowd"] == 0
        assert listed[24]["category_id"] == 11
        assert (ids == 0).sum() == 2 * W + 8
    split = load_split(out, "val")
    assert split.read_image(split.images[0]).shape == (H, W, 3)
    assert (out / "val.segments.parquet").is_file()


def test_import_errors_name_the_path(tmp_path):
    with pytest.raises(CabbRayError, match="gtFine: folder not found"):
        import_cityscapes(tmp_path, tmp_path / "out")
    src = tmp_path / "cs"
    _fake_cityscapes(src, splits=("train",))
    with pytest.raises(CabbRayError, match=r"gtFine/val: no \*_gtFine_instanceIds.png files found"):
        import_cityscapes(src, tmp_path / "out")
    missing = src / "leftImg8bit" / "train" / "bonn" / "bonn_000001_000019_leftImg8bit.png"
    missing.unlink()
    with pytest.raises(CabbRayError, match=r"bonn_000001_000019_leftImg8bit\.png: image for"):
        import_cityscapes(src, tmp_path / "out", splits=("train",))


def _snapshot(folder):
    """Every path under ``folder`` with its bytes (a link: where it points)."""
    return {
        str(p.relative_to(folder)): (
            ("->", str(p.readlink())) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        )
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("where", ["convert", "index"])
def test_a_failed_import_leaves_the_previous_output_intact(tmp_path, monkeypatch, where):
    """Both splits are built beside the output and moved in only when complete: a failure in
    the second split's conversion or index leaves the first import as it was."""
    from cabb_ray.data import cityscapes
    from cabb_ray.data.index import read_segment_index

    src, out = tmp_path / "cs", tmp_path / "out"
    _fake_cityscapes(src)
    import_cityscapes(src, out)
    (out / "notes.txt").write_text("not the import's")
    before = _snapshot(out)

    target = cityscapes.convert2panoptic if where == "convert" else cityscapes.build_segment_index

    def fail_on_val(*args, **kwargs):
        if "val" in (kwargs.get("setNames") or [args[1] if len(args) > 1 else None]):
            raise RuntimeError(f"{where} failed")
        return target(*args, **kwargs)

    name = "convert2panoptic" if where == "convert" else "build_segment_index"
    monkeypatch.setattr(cityscapes, name, fail_on_val)
    with pytest.raises(RuntimeError, match=f"{where} failed"):
        import_cityscapes(src, out, copy=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cs", "out"]  # no build folder left
    for split in ("train", "val"):
        data = load_split(out, split)
        assert data.read_panoptic(data.images[0]).shape == (H, W)
        assert read_segment_index(out, split).num_rows > 0


def test_a_new_import_replaces_the_old_one_and_keeps_other_files(tmp_path):
    src, out = tmp_path / "cs", tmp_path / "out"
    _fake_cityscapes(src)
    import_cityscapes(src, out)
    stale = out / "images" / "train" / "stale_leftImg8bit.png"
    stale.write_bytes(b"from an older import")
    (out / "test.json").write_text("{}")  # a split this import does not write
    import_cityscapes(src, out, splits=("train",), copy=True)
    assert not stale.exists() and (out / "test.json").read_text() == "{}"
    images = list((out / "images" / "train").iterdir())
    assert images and not any(p.is_symlink() for p in images)  # --copy this time
    assert (out / "val.json").is_file()  # the earlier import's other split stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cs", "out"]


def test_a_failure_while_moving_in_puts_the_old_output_back(tmp_path, monkeypatch):
    from cabb_ray.data import cityscapes

    src, out = tmp_path / "cs", tmp_path / "out"
    _fake_cityscapes(src)
    import_cityscapes(src, out)
    before = _snapshot(out)
    real, calls = cityscapes._rename, []

    def fail_halfway(a, b):
        """Two renames an entry (the old one out, the new one in): train's four entries are
        in, val's old images are out, its new ones fail to go in."""
        calls.append(a)
        if len(calls) == 2 * 4 + 2:
            raise OSError(5, "Input/output error")
        real(a, b)

    monkeypatch.setattr(cityscapes, "_rename", fail_halfway)
    with pytest.raises(OSError, match="Input/output error"):
        import_cityscapes(src, out, copy=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cs", "out"]
