"""Training crops and samplers: geometry recomputed independently, ISUS levels, seeding."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from cabb_ray.config import ModelConfig, load_config
from cabb_ray.data.crop_dataset import CropDataset, collate_crops
from cabb_ray.data.crops import CropWindow, extract_crop
from cabb_ray.data.index import build_segment_index
from cabb_ray.data.level_balance import level_histogram, normalized_entropy
from cabb_ray.data.panoptic_format import id2rgb, write_split_json
from cabb_ray.data.samplers import isus_scale
from cabb_ray.errors import CabbRayError
from cabb_ray.losses.cabb import crop_aware_targets
from cabb_ray.model.network import build_model
from cabb_ray.structures.classes import ClassMapping
from cabb_ray.structures.levels import box_levels
from tests.independent_reader import read_ids, read_split

SMALL_CROP = ["data.crop_size=[64, 96]", "data.shortest_side=128", "model.canonical_scale=28"]


def config(sampler: str, *extra: str):
    return load_config("cpu_quickstart", [*SMALL_CROP, f"data.sampler={sampler}", *extra])


def _expected(sample, root, split="train", min_visible=16):
    """Recompute masks, boxes and cut flags from the full-resolution PNG alone."""
    meta = sample["meta"]
    data = read_split(root, split)
    ann = next(a for a in data["annotations"] if a["image_id"] == meta["image_id"])
    full = read_ids(root / split / ann["file_name"])
    x0, y0, x1, y1 = meta["window"]
    scale = meta["scale"]
    h, w = sample["image"].shape[1:]
    rows = np.floor(y0 + (np.arange(h) + 0.5) / scale).astype(int)
    cols = np.floor(x0 + (np.arange(w) + 0.5) / scale).astype(int)
    crop = np.zeros((h, w), dtype=np.int64)
    r_ok = (rows >= 0) & (rows < full.shape[0])
    c_ok = (cols >= 0) & (cols < full.shape[1])
    crop[np.ix_(r_ok, c_ok)] = full[np.ix_(rows[r_ok], cols[c_ok])]
    if meta["flip"]:
        crop = crop[:, ::-1]
    things = {c["id"] for c in data["categories"] if c["isthing"]}
    expected = {}
    for seg in ann["segments_info"]:
        if seg["category_id"] not in things or seg["iscrowd"]:
            continue
        mask = crop == seg["id"]
        if mask.sum() < min_visible:
            continue
        ys, xs = np.nonzero(mask)
        fy, fx = np.nonzero(full == seg["id"])
        cut = [
            bool((fx + 0.5 < x0).any()),
            bool((fy + 0.5 < y0).any()),
            bool((fx + 0.5 >= x1).any()),
            bool((fy + 0.5 >= y1).any()),
        ]
        if meta["flip"]:
            cut = [cut[2], cut[1], cut[0], cut[3]]
        expected[seg["id"]] = (mask, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], cut)
    return expected


@pytest.mark.parametrize("sampler", ["random", "cus", "isus"])
def test_masks_boxes_and_cut_flags_match_an_independent_recomputation(synthetic_root, sampler):
    dataset = CropDataset(synthetic_root, config(sampler), length=40, seed=5)
    cut_seen = flips = 0
    for i in range(40):
        sample = dataset[i]
        target = sample["target"]
        expected = _expected(sample, synthetic_root)
        assert sorted(expected) == sorted(target["segment_ids"].tolist())
        for k, seg_id in enumerate(target["segment_ids"].tolist()):
            mask, box, cut = expected[seg_id]
            assert np.array_equal(target["masks"][k].numpy().astype(bool), mask)
            assert target["boxes"][k].tolist() == box
            assert target["cut"][k].tolist() == cut
            cut_seen += sum(cut)
        flips += sample["meta"]["flip"]
        assert sample["image"].shape == (3, 64, 96)
        assert 0.75 <= sample["meta"]["sigma"] <= 1.5 or sampler == "isus"
    assert cut_seen > 0 and 0 < flips < 40


def test_flip_mirrors_masks_and_swaps_left_right_cut(synthetic_root):
    data = read_split(synthetic_root, "train")
    ann = data["annotations"][0]
    ids = read_ids(synthetic_root / "train" / ann["file_name"])
    image = np.zeros((*ids.shape, 3), dtype=np.uint8)
    classes = ClassMapping.from_categories(data["categories"])
    plain = CropWindow(30.3, 20.7, 1.3, 48, 64, flip=False)
    flipped = dataclasses.replace(plain, flip=True)
    a = extract_crop(image, ids, ann["segments_info"], classes, plain, 1)["target"]
    b = extract_crop(image, ids, ann["segments_info"], classes, flipped, 1)["target"]
    assert torch.equal(a["masks"].flip(-1), b["masks"])
    assert torch.equal(a["cut"][:, [2, 1, 0, 3]], b["cut"])
    assert torch.equal(a["semantic"].flip(-1), b["semantic"])
    width = 64
    assert torch.allclose(b["boxes"][:, [0, 2]], width - a["boxes"][:, [2, 0]])


def test_touching_is_not_cut_and_padding_is_ignored():
    ids = np.zeros((20, 20), dtype=np.int64)
    ids[5:10, 5:10] = 26001  # a car filling source columns/rows 5..9
    ids[ids == 0] = 7
    segments = [
        {"id": 7, "category_id": 0, "iscrowd": 0, "bbox": [0, 0, 20, 20], "area": 375},
        {"id": 26001, "category_id": 13, "iscrowd": 0, "bbox": [5, 5, 5, 5], "area": 25},
    ]
    classes = ClassMapping((0, 13), (13,))
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    touching = CropWindow(5.0, 5.0, 1.0, 5, 5)  # exactly the car
    sample = extract_crop(image, ids, segments, classes, touching, 1)["target"]
    assert sample["cut"].tolist() == [[False, False, False, False]]
    cut = CropWindow(6.0, 5.0, 1.0, 5, 5)  # starts one column into the car
    assert extract_crop(image, ids, segments, classes, cut, 1)["target"]["cut"].tolist() == [
        [True, False, False, False]
    ]
    overhang = CropWindow(-4.0, -4.0, 1.0, 16, 16)  # past the top-left corner, car inside
    target = extract_crop(image, ids, segments, classes, overhang, 1)["target"]
    assert (target["semantic"][:4] == 255).all() and (target["semantic"][:, :4] == 255).all()
    assert target["cut"].tolist() == [[False, False, False, False]]
    assert target["full_boxes"].tolist() == [[9.0, 9.0, 14.0, 14.0]]


def test_small_instances_are_dropped_but_keep_their_semantic_class(synthetic_root):
    dataset = CropDataset(synthetic_root, config("cus", "data.min_visible_pixels=400"), length=20)
    sample = dataset[3]
    target = sample["target"]
    assert all(int(m.sum()) >= 400 for m in target["masks"])
    expected = _expected(sample, synthetic_root, min_visible=400)
    assert sorted(expected) == sorted(target["segment_ids"].tolist())


def test_isus_scale_lands_on_the_drawn_level_and_spreads_uniformly():
    model = ModelConfig(canonical_scale=56.0)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        size = math.exp(rng.uniform(math.log(0.5), math.log(5000)))
        level, sigma = isus_scale(size, model, (0.25, 4.0), rng)
        assert 0.25 <= sigma <= 4.0
        assert level_of_size(size * sigma, model) == level
    counts = np.bincount([isus_scale(60.0, model, (0.25, 4.0), rng)[0] for _ in range(4000)])[2:]
    assert len(counts) == 4 and counts.min() > 0.2 * 4000  # 60 px reaches all four levels


def test_isus_is_flatter_than_cus_where_sizes_pile_up(synthetic_root):
    """With a canonical scale that puts most instances on the finest level (the situation ISUS
    is for), ISUS spreads both the sampled and all instances more evenly than CUS."""
    extra = "model.canonical_scale=112"
    entropy = {}
    for sampler in ("cus", "isus"):
        dataset = CropDataset(synthetic_root, config(sampler, extra), length=300, seed=4)
        every, focus = level_histogram(dataset, 300)
        entropy[sampler] = (normalized_entropy(every), normalized_entropy(focus))
    assert entropy["isus"][0] > entropy["cus"][0] + 0.05
    assert entropy["isus"][1] > entropy["cus"][1] + 0.05
    assert entropy["isus"][1] >= 0.85


def test_isus_order_switch_literal_order_reaches_the_top_level_less(synthetic_root):
    """As samplers.py documents: in the paper's literal order (instance, level, clamp) most
    instances are small, so draws of the top levels are clamped down; fewer focus instances
    land on the top level and the spread is less even than level-first's."""
    extra = "model.canonical_scale=56"
    result = {}
    for order in ("level_first", "instance_first"):
        cfg = config("isus", extra, f"data.isus_order={order}")
        _, focus = level_histogram(CropDataset(synthetic_root, cfg, length=500, seed=4), 500)
        result[order] = (normalized_entropy(focus), focus[5] / max(sum(focus.values()), 1))
    assert result["instance_first"][1] < result["level_first"][1] - 0.03
    assert result["instance_first"][0] < result["level_first"][0] - 0.02


def test_cabb_target_cut_edges_reach_the_crop_border(synthetic_root):
    """CABB regresses a cut side towards the crop border, never towards a visible-mask edge
    that stops inside the crop: checked against cut flags recomputed from the full-resolution
    PNG and the window, for the RPN's and the RoI heads' targets, and for the CABB solution
    they lead to whatever the prediction."""
    cfg = config("isus")
    dataset = CropDataset(synthetic_root, cfg, length=80, seed=7)
    model = build_model(cfg, dataset.sampler.split.categories)
    heads, coder = model.roi_heads, model.roi_heads.box_coder
    rng = torch.Generator().manual_seed(0)
    short_of_border = 0
    for i in range(80):
        sample = dataset[i]
        target = sample["target"]
        if not len(target["boxes"]):
            continue
        expected = _expected(sample, synthetic_root)
        cut = torch.tensor([expected[s][2] for s in target["segment_ids"].tolist()])
        h, w = sample["image"].shape[1:]
        border = torch.tensor([0.0, 0.0, float(w), float(h)]).expand_as(target["boxes"])
        short_of_border += int(((target["boxes"] != border) & cut).sum())
        aimed = torch.where(cut, border, target["boxes"])

        outward = torch.tensor([-1.0, -1.0, 1.0, 1.0])
        anchors = target["boxes"] + outward * torch.rand(target["boxes"].shape, generator=rng)
        labels, matched = model.rpn.assign_targets_to_anchors([anchors], [target])
        rows = matched[0][labels[0] > 0]
        assert (rows[:, None, :] == aimed[None]).all(dim=2).any(dim=1).all()

        proposals = target["boxes"] + 3 * outward * torch.rand(target["boxes"].shape, generator=rng)
        index = torch.arange(len(proposals))
        plain = coder.encode_single(target["boxes"], proposals)
        (encoded,) = heads.crop_aware_regression_targets(
            [target], [index], [proposals], [cut], [plain]
        )
        torch.testing.assert_close(
            coder.decode_single(encoded, proposals), aimed, atol=1e-3, rtol=0
        )
        best = crop_aware_targets(
            torch.randn(encoded.shape, generator=rng), encoded, cut, coder.weights
        )
        box = coder.decode_single(best, proposals)
        assert (box[:, :2][cut[:, :2]] <= 1e-3).all()
        assert (box[:, 2][cut[:, 2]] >= w - 1e-3).all() and (box[:, 3][cut[:, 3]] >= h - 1e-3).all()
    assert short_of_border > 0, "no cut side stopped inside the crop: the test checks nothing"


def test_ranks_differ_and_seeds_reproduce(synthetic_root):
    cfg = config("isus")
    a = CropDataset(synthetic_root, cfg, rank=0, length=6, seed=1)
    b = CropDataset(synthetic_root, cfg, rank=1, length=6, seed=1)
    again = CropDataset(synthetic_root, cfg, rank=0, length=6, seed=1)
    windows = [a[i]["meta"]["window"] for i in range(6)]
    assert windows != [b[i]["meta"]["window"] for i in range(6)]
    for i in range(6):
        assert torch.equal(a[i]["image"], again[i]["image"])
    a.set_epoch(1)
    assert windows != [a[i]["meta"]["window"] for i in range(6)]


def test_stream_does_not_depend_on_loader_workers(synthetic_root):
    from torch.utils.data import DataLoader

    dataset = CropDataset(synthetic_root, config("cus"), length=8, seed=2)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_crops)
        batches.append([torch.stack(images) for images, _, _ in loader])
    assert all(torch.equal(x, y) for x, y in zip(*batches, strict=True))


def test_full_sampler_returns_whole_images_without_cuts(synthetic_root):
    sample = CropDataset(synthetic_root, config("full"), length=2)[0]
    assert not sample["target"]["cut"].any()
    h, w = sample["image"].shape[1:]
    assert min(h, w) == pytest.approx(128 * sample["meta"]["sigma"], abs=1)


# ---------------------------------------------------------------- bad input


def test_crop_larger_than_rescaled_image(synthetic_root):
    with pytest.raises(CabbRayError, match=r"data\.crop_size \[256, 96\] is larger than image"):
        CropDataset(synthetic_root, config("cus", "data.crop_size=[256, 96]"))


def test_isus_needs_thing_instances(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "images" / "train").mkdir(parents=True)
    ids = np.full((64, 128), 7, dtype=np.int64)
    from PIL import Image

    Image.fromarray(id2rgb(ids)).save(tmp_path / "train" / "a.png")
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(tmp_path / "images" / "train" / "a.jpg")
    categories = [{"id": 0, "name": "road", "isthing": 0}, {"id": 13, "name": "car", "isthing": 1}]
    segs = [{"id": 7, "category_id": 0, "iscrowd": 0, "area": 64 * 128, "bbox": [0, 0, 128, 64]}]
    write_split_json(
        tmp_path,
        "train",
        [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 128}],
        [{"image_id": 1, "file_name": "a.png", "segments_info": segs}],
        categories,
    )
    build_segment_index(tmp_path, "train")
    with pytest.raises(CabbRayError, match=r"data\.sampler=isus needs thing instances"):
        CropDataset(tmp_path, config("isus", "data.crop_size=[32, 32]"))
    assert CropDataset(tmp_path, config("cus", "data.crop_size=[32, 32]"), length=1)[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sampler=uniform", "expected one of 'random', 'cus', 'isus', 'full'"),
        ("data.r_th=[4, 0.25]", "data.r_th: expected 0 < low <= high"),
    ],
)
def test_bad_sampler_settings(override, message):
    with pytest.raises(CabbRayError, match=message):
        load_config("cpu_quickstart", [override])


def test_preview_writes_grid_and_manifest(synthetic_root, tmp_path):
    from cabb_ray.data.__main__ import main

    main(
        [
            "preview",
            "--root",
            str(synthetic_root),
            "--sampler",
            "isus",
            "--num",
            "5",
            "--out",
            str(tmp_path),
            *[arg for s in SMALL_CROP for arg in ("--set", s)],
        ]
    )
    manifest = json.loads((tmp_path / "samples.json").read_text())
    assert manifest["sampler"] == "isus" and len(manifest["crops"]) == 5
    crop = manifest["crops"][0]
    assert {"image_id", "window", "scale", "sigma", "flip", "instances"} <= set(crop)
    from PIL import Image

    assert Image.open(tmp_path / "crops.png").size[0] >= 5 * 96


def test_persistent_loader_workers_follow_the_epoch(synthetic_root):
    """The run's one DataLoader keeps its worker processes; each epoch's crops must still be
    that epoch's (the workers' dataset copies never see set_epoch)."""
    from cabb_ray.data.crop_dataset import crop_loader, epoch_batches

    cfg = config("isus", "data.loader_workers=2", "data.batch_size=2")
    dataset = CropDataset(synthetic_root, cfg, length=4, seed=3)
    loader = crop_loader(dataset)
    assert loader.persistent_workers
    for epoch in (0, 1, 0):
        got = [m["window"] for _, _, metas in epoch_batches(loader, epoch) for m in metas]
        dataset.set_epoch(epoch)
        assert got == [dataset[i]["meta"]["window"] for i in range(4)], epoch


def level_of_size(size: float, model) -> int:
    """The FPN level the network's own rule (``box_levels``) gives a square of side ``size``."""
    box = torch.tensor([[0.0, 0.0, size, size]])
    return int(box_levels(box, model)[0]) if size > 0 else model.roi_levels[0]
