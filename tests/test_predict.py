"""Panoptic fusion, checkpoints and ``python -m cabb_ray.predict``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cabb_ray.config import EvalConfig, load_config
from cabb_ray.errors import run_cli
from cabb_ray.model.checkpoint import save_checkpoint
from cabb_ray.model.fusion import panoptic_fusion
from cabb_ray.model.network import build_model
from cabb_ray.predict import main as predict_main
from cabb_ray.structures.classes import ClassMapping
from tests.independent_reader import read_ids

CLASSES = ClassMapping(category_ids=(0, 10, 13), thing_ids=(13,))  # road, sky, car


def _detection(masks, scores, semantic):
    n = len(masks)
    return {
        "masks": torch.tensor(np.array(masks, dtype=np.float32)).reshape(n, 1, *semantic.shape),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.ones(n, dtype=torch.int64),
        "boxes": torch.zeros(n, 4),
        "semantic": torch.nn.functional.one_hot(torch.tensor(semantic), 3).permute(2, 0, 1).float(),
    }


def test_fusion_places_instances_by_score_and_fills_stuff():
    semantic = np.zeros((4, 6), dtype=np.int64)  # road
    semantic[0, :] = 1  # sky on the top row
    semantic[3, 5] = 2  # a lone car pixel in the semantic map, without an instance
    a = np.zeros((4, 6))
    a[1:3, 0:3] = 1  # 6 px, score 0.9
    b = np.zeros((4, 6))
    b[1:3, 2:4] = 1  # 4 px, overlaps a by 2 px (50%), score 0.8: kept, trimmed
    c = np.zeros((4, 6))
    c[1:3, 0:2] = 1  # inside a: overlap 100%, dropped
    d = np.zeros((4, 6))
    d[3, 0:2] = 1  # low score: dropped
    thresholds = EvalConfig(score_threshold=0.5, overlap_threshold=0.5, stuff_min_area=3)
    result = panoptic_fusion(
        _detection([a, b, c, d], [0.9, 0.8, 0.7, 0.3], semantic), CLASSES, thresholds
    )
    cars = [s for s in result.segments if s["category_id"] == 13]
    assert [s["area"] for s in cars] == [6, 2]
    assert [s["score"] for s in cars] == pytest.approx([0.9, 0.8])
    stuff = {s["category_id"]: s["area"] for s in result.segments if s["category_id"] != 13}
    assert stuff == {10: 6, 0: 24 - 6 - 8 - 1}  # road: the rest minus the semantic car pixel
    assert result.ids[3, 5] == 0  # thing-class pixel without an instance: void
    assert len(result.instances) == 4  # every detection is kept for mask AP
    present = set(np.unique(result.ids).tolist()) - {0}
    assert present == {s["id"] for s in result.segments}


def test_prediction_at_another_scale_returns_boxes_and_masks_at_the_images_size():
    """The network sees the image rescaled to shortest side s0; the detector's boxes come
    back in the image's own pixels (box AP compares them with full-resolution GT)."""
    from cabb_ray.training.engine import predict_image

    semantic = np.zeros((32, 64), dtype=np.int64)
    mask = np.zeros((32, 64))
    mask[2:10, 4:20] = 1
    detection = _detection([mask], [0.9], semantic)
    detection["boxes"] = torch.tensor([[4.0, 2.0, 20.0, 10.0]])
    seen = []

    def network(images):
        seen.append(tuple(images[0].shape))
        return [detection]

    overrides = ["data.shortest_side=32", "data.crop_size=[32,32]", "eval.stuff_min_area=1"]
    cfg = load_config("cpu_quickstart", overrides)
    image = np.zeros((64, 128, 3), dtype=np.uint8)
    prediction = predict_image(network, image, cfg, CLASSES, torch.device("cpu"))
    assert seen == [(3, 32, 64)] and prediction.ids.shape == (64, 128)
    (instance,) = prediction.instances
    assert instance["box"] == pytest.approx([8.0, 4.0, 40.0, 20.0])
    assert instance["mask"].shape == (64, 128) and instance["mask"].sum() == 4 * 8 * 16


def test_stuff_below_min_area_is_void():
    semantic = np.zeros((3, 3), dtype=np.int64)
    semantic[0, 0] = 1  # one sky pixel
    result = panoptic_fusion(_detection([], [], semantic), CLASSES, EvalConfig(stuff_min_area=2))
    assert result.ids[0, 0] == 0 and {s["category_id"] for s in result.segments} == {0}


@pytest.fixture
def checkpoint(synthetic_root, tmp_path):
    cfg = load_config("cpu_quickstart", ["eval.stuff_min_area=16"])
    categories = json.loads((synthetic_root / "val.json").read_text())["categories"]
    torch.manual_seed(0)
    model = build_model(cfg, categories)
    return save_checkpoint(tmp_path / "ckpt.pt", model, cfg, categories, step=7)


def _predict(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, argv)
    return exit_info.value.code, capsys.readouterr()


def test_predict_writes_pngs_json_and_overlays(synthetic_root, checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(synthetic_root / "images" / "val", images)
    out = tmp_path / "out"
    code, _ = _predict(
        [
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(images),
            "--out",
            str(out),
            "--categories",
            str(synthetic_root / "val.json"),
        ],
        capsys,
    )
    assert code == 0
    result = json.loads((out / "predictions.json").read_text())
    assert len(result["annotations"]) == 3
    for ann in result["annotations"]:
        ids = read_ids(out / "panoptic" / ann["file_name"])
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
        # predicted at the training scale (shortest side 256 for 128-px images), stored at
        # input size: areas describe the stored map
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())
        assert (out / "overlays" / ann["file_name"].replace(".png", ".jpg")).is_file()
        assert ids.shape == (128, 256)
    # with --categories, the dataset's own image ids: cabb_ray.evaluate matches them
    gt = json.loads((synthetic_root / "val.json").read_text())
    assert sorted(a["image_id"] for a in result["annotations"]) == sorted(
        i["id"] for i in gt["images"]
    )


def test_predict_bad_input(synthetic_root, checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, captured = _predict(
        ["--checkpoint", str(checkpoint), "--images", str(empty), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == 2 and captured.err.strip() == f"error: {empty}: no .png/.jpg images found"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not an image")
    code, captured = _predict(
        ["--checkpoint", str(checkpoint), "--images", str(broken), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == 2 and captured.err.startswith(f"error: {broken / 'x.png'}: cannot decode image")

    other = json.loads((synthetic_root / "val.json").read_text())
    other["categories"] = other["categories"][:-1]
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, captured = _predict(
        [
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(broken),
            "--out",
            str(tmp_path / "o"),
            "--categories",
            str(tmp_path / "other.json"),
        ],
        capsys,
    )
    assert (
        code == 2
        and "trained on another class set" in captured.err
        and captured.err.count("\n") == 1
    )

    payload = torch.load(checkpoint, weights_only=False)
    payload["config"]["model"]["fpn_channels"] = 32
    torch.save(payload, tmp_path / "arch.pt")
    code, captured = _predict(
        [
            "--checkpoint",
            str(tmp_path / "arch.pt"),
            "--images",
            str(broken),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "weights do not fit the cpu_small network" in captured.err

    (tmp_path / "junk.pt").write_bytes(b"junk")
    code, captured = _predict(
        [
            "--checkpoint",
            str(tmp_path / "junk.pt"),
            "--images",
            str(broken),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "not a readable checkpoint" in captured.err
