"""Panoptic metrics: parity with cityscapesscripts, hand-worked cases, merging, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as reference
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cabb_ray.errors import CabbRayError, run_cli
from cabb_ray.evaluate import main as evaluate_main
from cabb_ray.metrics import PanopticEvaluator, evaluate_folders
from cabb_ray.metrics.mask_ap import encode_segments
from tests.fake_predictions import _to_png, write_fake_predictions

CAR, PERSON, ROAD, SKY = 13, 11, 0, 10
CATEGORIES = [
    {"id": ROAD, "name": "road", "isthing": 0},
    {"id": SKY, "name": "sky", "isthing": 0},
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": CAR, "name": "car", "isthing": 1},
]


def seg(seg_id, category, iscrowd=0, area=None, **extra):
    return {"id": seg_id, "category_id": category, "iscrowd": iscrowd, "area": area, **extra}


def with_areas(ids, segments):
    """Fill GT areas from the map, as a dataset writer would."""
    return [{**s, "area": int((ids == s["id"]).sum())} for s in segments]


def evaluate(pairs, categories=CATEGORIES, mask_ap=False):
    ev = PanopticEvaluator(categories, mask_ap=mask_ap)
    for k, (gt, gt_segs, pred, pred_segs) in enumerate(pairs):
        ev.update(k, gt, with_areas(gt, gt_segs), pred, pred_segs)
    return ev.compute()


def row(result, category):
    return next(r for r in result.per_class if r["id"] == category)


# ---------------------------------------------------------------- parity with cityscapesscripts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_parity_with_cityscapesscripts(synthetic_root, tmp_path, seed):
    split = "train" if seed % 2 else "val"
    pred_json, pred_folder = write_fake_predictions(synthetic_root, split, tmp_path, seed)
    ours = evaluate_folders(
        synthetic_root / f"{split}.json",
        synthetic_root / split,
        pred_json,
        pred_folder,
        mask_ap=False,
    )
    gt = json.loads((synthetic_root / f"{split}.json").read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = reference.pq_compute_single_core(
            0, pairs, str(synthetic_root / split), str(pred_folder), categories
        )
    expected = reference.average_pq(stat, categories)
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            assert ours.metrics[key + suffix] == pytest.approx(expected[name][key], abs=1e-9)
        assert ours.metrics["n" + suffix] == expected[name]["n"]
    compared = 0
    for r in ours.per_class:
        cat = stat[r["id"]]
        assert (r["tp"], r["fp"], r["fn"]) == (cat.tp, cat.fp, cat.fn)
        if cat.tp + cat.fp + cat.fn:
            compared += 1
            for key in ("pq", "sq", "rq"):
                assert r[key] == pytest.approx(expected["per_class"][r["id"]][key], abs=1e-9)
    assert compared >= 8


# ---------------------------------------------------------------- hand-worked cases


def test_iou_of_exactly_one_half_is_not_a_match():
    gt = np.zeros((4, 4), np.int64)
    gt[0:2, 0:2] = 26001  # car, 4 px
    pred = np.zeros_like(gt)
    pred[0, 0:2] = 7  # 2 px inside: IoU = 2 / (2 + 4 - 2) = 0.5
    result = evaluate([(gt, [seg(26001, CAR)], pred, [seg(7, CAR)])])
    car = row(result, CAR)
    assert (car["tp"], car["fp"], car["fn"]) == (0, 1, 1)
    assert car["pq"] == 0.0
    pred[1, 0] = 7  # 3 px inside: IoU 0.75, matched
    result = evaluate([(gt, [seg(26001, CAR)], pred, [seg(7, CAR)])])
    car = row(result, CAR)
    assert (car["tp"], car["fp"], car["fn"]) == (1, 0, 0)
    assert car["pq"] == car["sq"] == 0.75 and car["rq"] == 1.0


def test_void_is_removed_from_the_union_and_half_void_predictions():
    gt = np.zeros((4, 4), np.int64)
    gt[0:2, 0:2] = 26001
    pred = np.zeros_like(gt)
    pred[0:2, 0:3] = 7  # 4 px on the car, 2 px on void: IoU = 4 / (6 + 4 - 4 - 2) = 1
    result = evaluate([(gt, [seg(26001, CAR)], pred, [seg(7, CAR)])])
    assert row(result, CAR)["pq"] == 1.0
    # An unmatched prediction exactly half on void is a false positive (needs > 0.5) ...
    gt = np.full((4, 4), 7, np.int64)  # road everywhere
    gt[3, :] = 0
    pred = np.full_like(gt, 1)
    pred[2:4, 0:2] = 9  # car: 2 px road + 2 px void
    segs = [seg(1, ROAD), seg(9, CAR)]
    result = evaluate([(gt, [seg(7, ROAD)], pred, segs)])
    assert row(result, CAR)["fp"] == 1
    # ... and 3 of 4 pixels on void is ignored.
    pred[2, 1] = 1
    pred[3, 2] = 9
    result = evaluate([(gt, [seg(7, ROAD)], pred, segs)])
    assert row(result, CAR)["fp"] == 0


def test_crowd_is_never_matched_nor_a_false_negative():
    gt = np.full((4, 6), 7, np.int64)
    gt[0:2, 0:3] = 24  # crowd of persons, 6 px
    pred = np.full_like(gt, 1)
    pred[0:2, 1:3] = 5  # person, 4 px, all inside the crowd: not an FP
    pred[2:4, 4:6] = 6  # person, 4 px on road: an FP
    gt_segs = [seg(7, ROAD), seg(24, PERSON, iscrowd=1)]
    pred_segs = [seg(1, ROAD), seg(5, PERSON), seg(6, PERSON)]
    person = row(evaluate([(gt, gt_segs, pred, pred_segs)]), PERSON)
    assert (person["tp"], person["fp"], person["fn"]) == (0, 1, 0)


def test_accumulation_is_dataset_level_not_per_image():
    """Image 1: two cars found exactly; image 2: one car missed. Per-image PQ would average
    1.0 and 0.0 to 0.5; the dataset sums give 2 / (2 + 0.5) = 0.8."""
    one = np.zeros((2, 4), np.int64)
    one[:, 0:2], one[:, 2:4] = 26001, 26002
    two = np.zeros((2, 4), np.int64)
    two[:, 0:2] = 26001
    result = evaluate(
        [
            (
                one,
                [seg(26001, CAR), seg(26002, CAR)],
                one.copy(),
                [seg(26001, CAR), seg(26002, CAR)],
            ),
            (two, [seg(26001, CAR)], np.zeros_like(two), []),
        ]
    )
    assert row(result, CAR)["pq"] == pytest.approx(0.8)
    assert result.metrics["pq_th"] == pytest.approx(0.8)


def test_stuff_only_dataset_reports_nan_for_things():
    gt = np.zeros((2, 2), np.int64)
    gt[0], gt[1] = 7, 23
    pred = gt.copy()
    stuff = [c for c in CATEGORIES if not c["isthing"]]
    result = evaluate(
        [(gt, [seg(7, ROAD), seg(23, SKY)], pred, [seg(7, ROAD), seg(23, SKY)])], stuff
    )
    assert result.metrics["pq"] == result.metrics["pq_st"] == 1.0
    assert math.isnan(result.metrics["pq_th"]) and result.metrics["n_th"] == 0
    assert math.isnan(result.metrics["pc_th"])
    assert result.metrics["miou"] == 1.0 and result.metrics["pq_dagger"] == 1.0


def test_pc_pq_dagger_and_miou_by_hand():
    """Road (stuff) covers the bottom half; one car GT of 4 px; prediction: road on 6 of 8
    road pixels (2 predicted as car), car covering 2 of its 4 px plus 2 road px."""
    gt = np.zeros((4, 4), np.int64)
    gt[2:4, :] = 7  # road, 8 px
    gt[0:2, 0:2] = 26001  # car, 4 px; the other 4 px void
    pred = np.zeros_like(gt)
    pred[2:4, 2:4] = 1  # road 4 px
    pred[2:4, 0:2] = 1
    pred[2, 0:2] = 5  # car on 2 road px
    pred[0, 0:2] = 5  # car on 2 car px
    gt_segs = [seg(7, ROAD), seg(26001, CAR)]
    pred_segs = [seg(1, ROAD), seg(5, CAR)]
    result = evaluate([(gt, gt_segs, pred, pred_segs)])
    road, car = row(result, ROAD), row(result, CAR)
    # Road: inter 6, union 6 + 8 - 6 = 8 -> IoU 0.75 matched; car: inter 2, union 4 + 4 - 2 = 6.
    assert road["pq"] == 0.75 and car["pq"] == 0.0
    assert road["pc"] == 0.75 and car["pc"] == pytest.approx(2 / 6)
    # Semantic IoU: road 6 / (8 + 6 - 6) = 0.75; car 2 / (4 + 4 - 2) = 1/3.
    assert road["iou"] == 0.75 and car["iou"] == pytest.approx(1 / 3)
    assert result.metrics["miou"] == pytest.approx((0.75 + 1 / 3) / 2)
    # PQ-dagger: things' PQ (car 0) and stuff IoU (road 0.75).
    assert result.metrics["pq_dagger"] == pytest.approx(0.375)


def test_ids_above_65535_round_trip_through_png(tmp_path):
    gt = np.zeros((3, 5), np.int64)
    gt[:, 0:2], gt[:, 2:5] = 7, 26001
    pred = np.zeros_like(gt)
    pred[:, 0:2], pred[:, 2:5] = 70000, 16_000_001
    for name, ids in (("gt", gt), ("pred", pred)):
        (tmp_path / name).mkdir()
        _to_png(ids, tmp_path / name / "a.png")
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(
        json.dumps(
            {
                "categories": CATEGORIES,
                "annotations": [
                    {
                        "image_id": "a",
                        "file_name": "a.png",
                        "segments_info": with_areas(gt, [seg(7, ROAD), seg(26001, CAR)]),
                    }
                ],
            }
        )
    )
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "image_id": "a",
                        "file_name": "a.png",
                        "segments_info": [seg(70000, ROAD), seg(16_000_001, CAR)],
                    }
                ]
            }
        )
    )
    result = evaluate_folders(gt_json, tmp_path / "gt", pred_json, tmp_path / "pred")
    assert result.metrics["pq"] == 1.0 and result.metrics["map"] == pytest.approx(1.0)


# ---------------------------------------------------------------- merging across workers


def _fake_pairs(synthetic_root, tmp_path, split="train"):
    from cabb_ray.data.panoptic_format import read_ids

    pred_json, pred_folder = write_fake_predictions(synthetic_root, split, tmp_path, seed=11)
    gt = json.loads((synthetic_root / f"{split}.json").read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    return gt["categories"], [
        (
            a["image_id"],
            read_ids(synthetic_root / split / a["file_name"]),
            a["segments_info"],
            read_ids(pred_folder / a["file_name"]),
            pred[a["image_id"]]["segments_info"],
        )
        for a in gt["annotations"]
    ]


def test_merged_shards_equal_single_process(synthetic_root, tmp_path):
    categories, pairs = _fake_pairs(synthetic_root, tmp_path)
    single = PanopticEvaluator(categories)
    shards = [PanopticEvaluator(categories) for _ in range(3)]
    for k, pair in enumerate(pairs):
        single.update(*pair)
        shards[k % 3].update(*pair)
    merged = shards[0].merge(shards[1]).merge(shards[2])
    a, b = single.compute(), merged.compute()
    assert a.images == b.images == len(pairs)
    for key, value in a.metrics.items():
        assert b.metrics[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    for ra, rb in zip(a.per_class, b.per_class, strict=True):
        for key in ("pq", "sq", "rq", "pc", "iou"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-12, nan_ok=True)


def _distributed_worker(rank, world, port, payload, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    categories, pairs = payload
    ev = PanopticEvaluator(categories)
    for pair in pairs[rank::world]:
        ev.update(*pair)
    ev.all_reduce()
    result = ev.compute()
    if rank == 0:
        out.put(result.metrics)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.integration
def test_all_reduce_over_two_gloo_processes(synthetic_root, tmp_path):
    import socket

    import torch.multiprocessing as mp

    categories, pairs = _fake_pairs(synthetic_root, tmp_path)
    single = PanopticEvaluator(categories)
    for pair in pairs:
        single.update(*pair)
    expected = single.compute().metrics
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _distributed_worker,
        args=(2, port, (categories, pairs), queue),
        nprocs=2,
        start_method="spawn",
    )
    got = queue.get()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key


# ---------------------------------------------------------------- mask AP


def test_column_band_rle_equals_full_mask_encoding():
    rng = np.random.default_rng(0)
    index = rng.integers(0, 4, size=(37, 53)).astype(np.uint8)
    index[:, :5] = 0
    index[:, -3:] = 0
    for k, rle in zip([1, 2, 3], encode_segments(index, [1, 2, 3]), strict=True):
        full = mask_utils.encode(np.asfortranarray((index == k).astype(np.uint8)))
        assert rle["counts"] == full["counts"] and rle["size"] == full["size"]


def _reference_cocoeval(images, gts, dets, things, iou_type: str) -> COCOeval:
    """pycocotools' own evaluation of full-image annotations, summarised."""
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": gts,
        "categories": [{"id": c} for c in sorted(things)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        check = COCOeval(coco, coco.loadRes(dets), iouType=iou_type)
        check.evaluate()
        check.accumulate()
        check.summarize()
    return check


def test_mask_ap_matches_cocoeval_on_full_masks(synthetic_root, tmp_path):
    categories, pairs = _fake_pairs(synthetic_root, tmp_path)
    ev = PanopticEvaluator(categories)
    gts, dets, images = [], [], []
    things = {c["id"] for c in categories if c["isthing"]}
    for n, (image_id, gt, gt_segs, pred, pred_segs) in enumerate(pairs, 1):
        ev.update(image_id, gt, gt_segs, pred, pred_segs)
        images.append({"id": n, "height": gt.shape[0], "width": gt.shape[1]})
        for s in gt_segs:
            if s["category_id"] in things:
                rle = mask_utils.encode(np.asfortranarray((gt == s["id"]).astype(np.uint8)))
                gts.append(
                    {
                        "id": len(gts) + 1,
                        "image_id": n,
                        "category_id": s["category_id"],
                        "iscrowd": s["iscrowd"],
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": list(mask_utils.toBbox(rle)),
                    }
                )
        for s in pred_segs:
            if s["category_id"] in things:
                rle = mask_utils.encode(np.asfortranarray((pred == s["id"]).astype(np.uint8)))
                dets.append(
                    {
                        "image_id": n,
                        "category_id": s["category_id"],
                        "segmentation": rle,
                        "score": s["score"],
                    }
                )
    check = _reference_cocoeval(images, gts, dets, things, "segm")
    result = ev.compute()
    assert result.metrics["map"] == pytest.approx(check.stats[0], abs=1e-12)
    assert result.metrics["map50"] == pytest.approx(check.stats[1], abs=1e-12)
    assert {k for k in result.metrics if k.startswith("map_")} == {
        "map_p0-50",
        "map_p50-75",
        "map_p75-90",
        "map_p90-99",
        "map_p99-100",
    }


# ---------------------------------------------------------------- bad input


@pytest.fixture
def prediction_files(synthetic_root, tmp_path):
    pred_json, pred_folder = write_fake_predictions(synthetic_root, "val", tmp_path, seed=3)
    return synthetic_root, pred_json, pred_folder


def _argv(root, pred_json, pred_folder, *extra):
    return [
        "--gt-json",
        str(root / "val.json"),
        "--gt-folder",
        str(root / "val"),
        "--pred-json",
        str(pred_json),
        "--pred-folder",
        str(pred_folder),
        *extra,
    ]


def _cli(root, pred_json, pred_folder, capsys):
    argv = _argv(root, pred_json, pred_folder, "--no-mask-ap")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, argv)
    return exit_info.value.code, capsys.readouterr()


def test_cli_prints_table_and_writes_json(prediction_files, tmp_path, capsys):
    root, pred_json, pred_folder = prediction_files
    out = tmp_path / "results.json"
    argv = _argv(root, pred_json, pred_folder, "--out", str(out))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, argv)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "pq_dagger" in printed and "things" in printed
    saved = json.loads(out.read_text())
    assert set(saved["metrics"]) >= {
        "pq",
        "sq",
        "rq",
        "pq_th",
        "pc",
        "pq_dagger",
        "miou",
        "map",
        "map50",
    }
    assert len(saved["per_class"]) == 12


def test_prediction_size_mismatch(prediction_files, capsys):
    root, pred_json, pred_folder = prediction_files
    png = sorted(pred_folder.glob("*.png"))[0]
    from PIL import Image

    Image.new("RGB", (7, 5)).save(png)
    code, captured = _cli(root, pred_json, pred_folder, capsys)
    assert code == 2 and captured.err.startswith(
        f"error: {png}: size 7x5 differs from the ground truth's"
    )


def test_png_id_missing_from_prediction_json(prediction_files, capsys):
    root, pred_json, pred_folder = prediction_files
    data = json.loads(pred_json.read_text())
    removed = data["annotations"][0]["segments_info"].pop()
    pred_json.write_text(json.dumps(data))
    code, captured = _cli(root, pred_json, pred_folder, capsys)
    png = pred_folder / data["annotations"][0]["file_name"]
    assert code == 2
    assert (
        captured.err.strip()
        == f"error: {png}: segment id {removed['id']} in the PNG is missing from segments_info"
    )


def test_unknown_category_and_missing_image(prediction_files, capsys):
    root, pred_json, pred_folder = prediction_files
    data = json.loads(pred_json.read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 99
    pred_json.write_text(json.dumps(data))
    code, captured = _cli(root, pred_json, pred_folder, capsys)
    assert code == 2 and "has unknown category_id 99" in captured.err
    data["annotations"][0]["segments_info"][0]["category_id"] = 0
    second = data["annotations"].pop(1)
    pred_json.write_text(json.dumps(data))
    code, captured = _cli(root, pred_json, pred_folder, capsys)
    assert code == 2 and f"{pred_json}: no prediction for image" in captured.err
    data["annotations"].insert(1, second)
    pred_json.write_text(json.dumps(data))
    missing = pred_folder / data["annotations"][0]["file_name"]
    missing.unlink()
    code, captured = _cli(root, pred_json, pred_folder, capsys)
    assert code == 2 and captured.err.strip() == f"error: {missing}: file not found"


def test_segments_info_id_absent_from_png():
    gt = np.full((2, 2), 7, np.int64)
    ev = PanopticEvaluator(CATEGORIES)
    with pytest.raises(CabbRayError, match="lists id 5 that does not occur in the PNG"):
        ev.update(
            0,
            gt,
            with_areas(gt, [seg(7, ROAD)]),
            gt.copy(),
            [seg(7, ROAD), seg(5, CAR)],
            "gt.png",
            "pred.png",
        )


def test_png_decoders_agree(tmp_path, monkeypatch):
    """torchvision's decoder (fast path) and Pillow's (fallback) give the same id map."""
    import sys

    from cabb_ray.data.panoptic_format import read_ids

    ids = np.random.default_rng(0).integers(0, 1 << 24, size=(9, 13))
    _to_png(ids, tmp_path / "ids.png")
    fast = read_ids(tmp_path / "ids.png")
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    slow = read_ids(tmp_path / "ids.png")
    assert np.array_equal(fast, ids) and np.array_equal(slow, ids)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CabbRayError, match=r"broken\.png: cannot decode PNG"):
        read_ids(tmp_path / "broken.png")


def test_semantic_label_maps_with_ignore():
    from cabb_ray.metrics.panoptic import PanopticAccumulator, summarize

    acc = PanopticAccumulator(3)
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 255, 0, 2]])  # 255 in a prediction counts as a miss
    acc.add_semantic(gt, pred)
    metrics, per_class = summarize(acc, np.array([False, False, True]))
    # class 0: hit 1, gt 2, pred 1 -> 1/2; class 1: hit 2, gt 2, pred 3 -> 2/3; class 2: 1/2.
    assert per_class["iou"].tolist() == pytest.approx([0.5, 2 / 3, 0.5])
    assert metrics["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


def test_mask_ap_from_overlapping_instances():
    """Detector output (overlapping masks with scores) can be scored instead of the segments:
    perfect masks give AP 1, and a duplicate with a lower score is a false positive only."""
    gt = np.zeros((8, 8), np.int64)
    gt[:, :4], gt[:, 4:] = 26001, 26002
    gt_segs = [seg(26001, CAR), seg(26002, CAR)]
    perfect = [
        {"category_id": CAR, "score": 0.9, "mask": gt == 26001},
        {"category_id": CAR, "score": 0.8, "mask": gt == 26002},
    ]
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(0, gt, with_areas(gt, gt_segs), np.zeros_like(gt), [], instances=perfect)
    assert ev.compute().metrics["map"] == pytest.approx(1.0)
    ev = PanopticEvaluator(CATEGORIES)
    duplicate = [*perfect, {"category_id": CAR, "score": 0.1, "mask": gt == 26001}]
    ev.update(0, gt, with_areas(gt, gt_segs), np.zeros_like(gt), [], instances=duplicate)
    assert ev.compute().metrics["map"] == pytest.approx(1.0)  # ranked last: no precision lost
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(0, gt, with_areas(gt, gt_segs), np.zeros_like(gt), [], instances=perfect[:1])
    assert ev.compute().metrics["map"] < 0.6  # half the cars missed


def test_box_ap_scores_the_detector_boxes_per_size_bin():
    """Box AP uses each instance's own box, not its mask's: exact boxes give AP 1 in every
    size bin; a box cut to half the large car's width (as crop training without CABB
    regresses it) misses at IoU 0.5 in the largest bin only, while mask AP is unchanged."""
    gt = np.zeros((40, 40), np.int64)
    gt[0:2, 0:2] = 26001  # small car (4 px)
    gt[10:30, 0:40] = 26002  # large car (800 px)
    gt_segs = [seg(26001, CAR), seg(26002, CAR)]
    exact = [
        {"category_id": CAR, "score": 0.9, "mask": gt == 26001, "box": [0, 0, 2, 2]},
        {"category_id": CAR, "score": 0.8, "mask": gt == 26002, "box": [0, 10, 40, 30]},
    ]
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(0, gt, with_areas(gt, gt_segs), np.zeros_like(gt), [], instances=exact)
    metrics = ev.compute().metrics
    assert metrics["box_map"] == pytest.approx(1.0)
    assert metrics["box_map_p99-100"] == pytest.approx(1.0)
    cut = [exact[0], {**exact[1], "box": [0, 10, 18, 30]}]  # IoU 0.45 with the GT box
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(0, gt, with_areas(gt, gt_segs), np.zeros_like(gt), [], instances=cut)
    metrics = ev.compute().metrics
    assert metrics["box_map_p99-100"] == pytest.approx(0.0)
    assert metrics["box_map_p0-50"] == pytest.approx(1.0)
    assert metrics["map_p99-100"] == pytest.approx(1.0)  # the masks are still exact


def test_over_crop_bin_holds_the_things_wider_or_taller_than_the_crop():
    """The absolute bin: with a 20 px crop (half the 40 px short side) only the 40 px wide
    car is in it. A cut box fails it while the percentile bins of the small cars keep AP 1;
    a confident false positive the size of a small car is ignored in it, as COCO ignores
    unmatched detections outside an area range; without a crop there is no such bin."""
    gt = np.zeros((40, 40), np.int64)
    gt[0:2, 0:2] = 26001  # 2 px: small
    gt[2:7, 2:7] = 26003  # 5 px: smaller than the crop
    gt[10:30, 0:40] = 26002  # 40 px wide: wider than the 20 px crop, not taller
    gt_segs = [seg(26001, CAR), seg(26003, CAR), seg(26002, CAR)]
    exact = [
        {"category_id": CAR, "score": 0.9, "mask": gt == 26001, "box": [0, 0, 2, 2]},
        {"category_id": CAR, "score": 0.85, "mask": gt == 26003, "box": [2, 2, 7, 7]},
        {"category_id": CAR, "score": 0.8, "mask": gt == 26002, "box": [0, 10, 40, 30]},
    ]
    false_positive = np.zeros_like(gt, dtype=bool)
    false_positive[35:39, 35:39] = True
    spurious = {"category_id": CAR, "score": 0.95, "mask": false_positive, "box": [35, 35, 39, 39]}

    def metrics(instances, crop_fraction=(0.5, 0.5)):
        ev = PanopticEvaluator(CATEGORIES, crop_fraction=crop_fraction)
        ev.update(0, gt, with_areas(gt, gt_segs), np.zeros_like(gt), [], instances=instances)
        return ev.compute().metrics

    found = metrics([*exact, spurious])
    assert found["things_over_crop"] == 1 and found["things_p0-50"] == 2
    assert found["box_map_over_crop"] == pytest.approx(1.0)
    assert found["map_over_crop"] == pytest.approx(1.0)
    assert found["box_map"] < 1.0  # the false positive counts everywhere else
    cut = metrics([*exact[:2], {**exact[2], "box": [0, 10, 18, 30]}])  # IoU 0.45
    assert cut["box_map_over_crop"] == pytest.approx(0.0)
    assert cut["map_over_crop"] == pytest.approx(1.0)  # the mask is still exact
    assert cut["box_map_p0-50"] == pytest.approx(1.0)
    taller_only = metrics([*exact[:2], {**exact[2], "box": [0, 10, 18, 30]}], (0.5, 1.0))
    assert math.isnan(taller_only["box_map_over_crop"])  # 40 px is not wider than 40 px
    assert "box_map_over_crop" not in metrics(exact, crop_fraction=None)


def test_box_ap_matches_cocoeval_bbox(synthetic_root, tmp_path):
    """Without detector boxes, box AP scores the segments' boxes exactly as COCOeval does."""
    categories, pairs = _fake_pairs(synthetic_root, tmp_path)
    ev = PanopticEvaluator(categories)
    things = {c["id"] for c in categories if c["isthing"]}
    gts, dets, images = [], [], []
    for n, (image_id, gt, gt_segs, pred, pred_segs) in enumerate(pairs, 1):
        ev.update(image_id, gt, gt_segs, pred, pred_segs)
        images.append({"id": n, "height": gt.shape[0], "width": gt.shape[1]})
        for ids, segs, out in ((gt, gt_segs, gts), (pred, pred_segs, dets)):
            for s in segs:
                if s["category_id"] not in things:
                    continue
                rle = mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
                item = {"image_id": n, "category_id": s["category_id"]}
                item["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
                if out is gts:
                    item.update(
                        id=len(gts) + 1, iscrowd=s["iscrowd"], area=float(mask_utils.area(rle))
                    )
                else:
                    item["score"] = s["score"]
                out.append(item)
    check = _reference_cocoeval(images, gts, dets, things, "bbox")
    result = ev.compute()
    assert result.metrics["box_map"] == pytest.approx(check.stats[0], abs=1e-12)
    assert result.metrics["box_map50"] == pytest.approx(check.stats[1], abs=1e-12)
    assert len([k for k in result.metrics if k.startswith("box_map_p")]) == 5


def test_unknown_ids_are_named_on_either_side():
    gt = np.full((3, 3), 7, np.int64)
    pred = gt.copy()
    gt[0, 0] = 99
    ev = PanopticEvaluator(CATEGORIES)
    with pytest.raises(CabbRayError, match=r"gt\.png: segment id 99 in the PNG is missing"):
        ev.update(0, gt, with_areas(gt, [seg(7, ROAD)]), pred, [seg(7, ROAD)], "gt.png", "p.png")
    gt[0, 0], pred[2, 2] = 7, 123456
    with pytest.raises(CabbRayError, match=r"p\.png: segment id 123456 in the PNG is missing"):
        ev.update(0, gt, with_areas(gt, [seg(7, ROAD)]), pred, [seg(7, ROAD)], "gt.png", "p.png")
