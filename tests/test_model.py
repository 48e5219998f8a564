"""The panoptic network: CABB-off equals torchvision exactly, CABB behaves on cut boxes,
and the CPU preset can fit a few crops."""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from cabb_ray.config import LOSS_TERMS, load_config
from cabb_ray.data.crop_dataset import CropDataset, collate_crops
from cabb_ray.errors import CabbRayError
from cabb_ray.losses.cabb import DEFAULT_BETA
from cabb_ray.model.crop_aware_roi_heads import CropAwareRoIHeads
from cabb_ray.model.crop_aware_rpn import CropAwareRPN
from cabb_ray.model.network import LOSS_NAMES, PanopticNet, build_model, network_kwargs

SMALL = ["data.crop_size=[64, 96]", "data.shortest_side=128", "model.canonical_scale=28"]


@pytest.fixture(scope="module")
def batch(synthetic_root):
    cfg = load_config("cpu_quickstart", SMALL)
    dataset = CropDataset(synthetic_root, cfg, length=4, seed=3)
    images, targets, _ = collate_crops([dataset[i] for i in range(4)])
    assert any(t["cut"].any() for t in targets), "the fixture batch should have cut boxes"
    return cfg, dataset.sampler.split.categories, images, targets


def _stock_rpn(rpn) -> RegionProposalNetwork:
    return RegionProposalNetwork(
        rpn.anchor_generator,
        rpn.head,
        rpn.proposal_matcher.high_threshold,
        rpn.proposal_matcher.low_threshold,
        rpn.fg_bg_sampler.batch_size_per_image,
        0.5,
        rpn._pre_nms_top_n,
        rpn._post_nms_top_n,
        rpn.nms_thresh,
    )


def _stock_roi_heads(heads) -> RoIHeads:
    return RoIHeads(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        0.5,
        0.5,
        heads.fg_bg_sampler.batch_size_per_image,
        0.25,
        heads.box_coder.weights,
        heads.score_thresh,
        heads.nms_thresh,
        heads.detections_per_img,
        mask_roi_pool=heads.mask_roi_pool,
        mask_head=heads.mask_head,
        mask_predictor=heads.mask_predictor,
    )


def _heads_losses(model, images, targets, rpn, roi_heads, seed=0):
    image_list = model.batch(images)
    features = model.backbone(image_list.tensors)
    torch.manual_seed(seed)
    proposals, rpn_losses = rpn(image_list, features, targets)
    torch.manual_seed(seed + 1)
    _, roi_losses = roi_heads(
        features, [p.detach() for p in proposals], image_list.image_sizes, targets
    )
    return {**rpn_losses, **roi_losses}


def test_cabb_off_equals_torchvision_exactly(batch):
    _cfg, categories, images, targets = batch
    off = load_config("cpu_quickstart", [*SMALL, "loss.cabb_rpn=false", "loss.cabb_roi=false"])
    torch.manual_seed(0)
    model = build_model(off, categories).train()
    ours = _heads_losses(model, images, targets, model.rpn, model.roi_heads)
    stock = _heads_losses(
        model, images, targets, _stock_rpn(model.rpn), _stock_roi_heads(model.roi_heads)
    )
    assert ours.keys() == stock.keys()
    for key in ours:
        assert torch.equal(ours[key], stock[key]), key


def test_cabb_on_without_cut_flags_equals_cabb_off(batch):
    cfg, categories, images, targets = batch
    uncut = [{**t, "cut": torch.zeros_like(t["cut"])} for t in targets]
    torch.manual_seed(0)
    model = build_model(cfg, categories).train()
    on = _heads_losses(model, images, uncut, model.rpn, model.roi_heads)
    model.rpn.cabb = model.roi_heads.cabb = False
    off = _heads_losses(model, images, uncut, model.rpn, model.roi_heads)
    for key in on:
        assert torch.equal(on[key], off[key]), key
    # ... while real cut flags lower the box losses and leave the others untouched.
    model.rpn.cabb = model.roi_heads.cabb = True
    cut = _heads_losses(model, images, targets, model.rpn, model.roi_heads)
    assert cut["loss_rpn_box_reg"] < off["loss_rpn_box_reg"]
    assert cut["loss_box_reg"] <= off["loss_box_reg"]
    for key in ("loss_objectness", "loss_classifier", "loss_mask"):
        assert torch.equal(cut[key], off[key]), key


def test_cut_box_is_not_pulled_back_inside_the_crop(batch):
    """A car cut by the crop's right edge at x = 64; the proposal is the whole car (to x = 100)
    and the head predicts it unchanged. Smooth-L1 pulls the right edge back to the crop edge;
    CABB accepts it (zero loss and gradient, up to float32 rounding)."""
    cfg, categories, *_ = batch
    heads = build_model(cfg, categories).roi_heads
    proposal = torch.tensor([[20.0, 10.0, 100.0, 50.0]])
    gt = torch.tensor([[20.0, 10.0, 64.0, 50.0]])
    target = heads.box_coder.encode([gt], [proposal])[0]
    labels = [torch.tensor([1])]
    logits = torch.zeros(1, heads.box_predictor.cls_score.out_features)
    regression = torch.zeros(1, 4 * logits.shape[1], requires_grad=True)
    cut = [torch.tensor([[False, False, True, False]])]
    heads.cabb = False
    _, plain = heads.box_loss(logits, regression, labels, [target], cut)
    (plain_grad,) = torch.autograd.grad(plain, regression)
    heads.cabb = True
    _, crop_aware = heads.box_loss(logits, regression, labels, [target], cut)
    (cabb_grad,) = torch.autograd.grad(crop_aware, regression)
    assert plain > 1.0 and crop_aware < 1e-9  # zero up to float32 rounding of the target
    dw = 4 * 1 + 2  # class 1, width delta
    assert plain_grad[0, dw] > 0.01  # gradient descent would shrink the width
    assert abs(cabb_grad[0, dw]) < 1e-6 * plain_grad[0, dw]


@pytest.mark.integration  # 56 full training steps
def test_cpu_preset_overfits_four_crops(batch):
    """Losses fall steadily on 4 crops: every 8-step window below the previous one, and the
    last below a quarter of the first (gradient clipping as the training loop will use). From
    the body-only start: heads that learn from scratch show the network's capacity to fit.
    56 steps: generator v2's crops hold more and larger things than v1's, which fit in 40."""
    cfg, categories, images, targets = batch
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="synthetic"))
    torch.manual_seed(0)
    model = build_model(cfg, categories).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    totals = []
    for _ in range(56):
        total = sum(model(images, targets).values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        totals.append(float(total))
    windows = [sum(totals[k : k + 8]) / 8 for k in range(0, 56, 8)]
    assert all(b < a for a, b in itertools.pairwise(windows)), windows
    assert windows[-1] < 0.25 * windows[0], windows


def test_inference_returns_full_resolution_predictions(batch):
    cfg, categories, _images, _ = batch
    model = build_model(cfg, categories).eval()
    odd = torch.rand(3, 70, 101)
    with torch.no_grad():
        (out,) = model([odd])
    assert out["semantic"].shape == (len(categories), 70, 101)
    assert out["masks"].shape[-2:] == (70, 101)
    assert set(out) >= {"boxes", "labels", "scores", "masks", "semantic"}


def test_detection_thresholds_come_from_the_config(batch):
    _cfg, categories, images, _ = batch
    scores = {}
    for threshold in (0.05, 0.2):
        overrides = [
            f"eval.detection_score_threshold={threshold}",
            "eval.detection_nms_threshold=0.3",
            "model.pretrained=synthetic",  # untrained heads: scores on both sides of 0.2
        ]
        torch.manual_seed(0)  # the same weights for both thresholds
        model = build_model(load_config("cpu_quickstart", [*SMALL, *overrides]), categories)
        assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh) == (threshold, 0.3)
        with torch.no_grad():
            scores[threshold] = torch.cat([d["scores"] for d in model.eval()(images)])
    assert len(scores[0.2]) and scores[0.2].min() >= 0.2
    assert ((scores[0.05] >= 0.05) & (scores[0.05] < 0.2)).any()  # the lower one keeps more
    with pytest.raises(CabbRayError, match=r"eval\.detection_score_threshold: expected 0\.\.1"):
        load_config("cpu_quickstart", ["eval.detection_score_threshold=1.5"])


def test_pretrained_options(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    from cabb_ray.errors import CabbRayError

    categories = [{"id": 0, "name": "road", "isthing": 0}, {"id": 13, "name": "car", "isthing": 1}]
    weights = tmp_path / "regnet.pth"
    reference = torchvision.models.regnet_y_400mf()
    torch.save(reference.state_dict(), weights)
    model = build_model(load_config("cpu_quickstart", [f"model.pretrained={weights}"]), categories)
    loaded = model.backbone.body.state_dict()
    assert torch.equal(
        loaded["block4.block4-0.f.b.0.weight"], reference.trunk_output.block4[0].f.b[0].weight
    )
    with pytest.raises(CabbRayError, match=r"nope\.pth not found \(expected none, imagenet"):
        build_model(
            load_config("cpu_quickstart", [f"model.pretrained={tmp_path / 'nope.pth'}"]), categories
        )
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CabbRayError, match="holds no regnet_y_400mf weights"):
        build_model(
            load_config("cpu_quickstart", [f"model.pretrained={tmp_path / 'other.pth'}"]),
            categories,
        )

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(
        CabbRayError, match=r"could not download .* --set model\.pretrained=/path/to"
    ):
        build_model(load_config("cpu_quickstart", ["model.pretrained=imagenet"]), categories)


def test_loss_names_are_the_config_loss_terms(batch):
    """One mapping from the modules' loss names to ours, the balancer's terms in their order;
    a training step returns exactly those, in that order."""
    assert tuple(LOSS_NAMES.values()) == LOSS_TERMS
    cfg, categories, images, targets = batch
    torch.manual_seed(0)
    losses = build_model(cfg, categories).train()(images, targets)
    assert tuple(losses) == LOSS_TERMS


def test_network_kwargs_fill_every_network_setting(batch):
    """``network_kwargs`` is the one place config is read: it names every keyword of
    ``PanopticNet`` but the class counts, and a network built from it directly has
    ``build_model``'s structure and settings."""
    cfg, categories, *_ = batch
    overrides = ["loss.roi_beta=0.25", "loss.cabb_rpn=false", "model.pretrained=synthetic"]
    cfg = load_config("cpu_quickstart", [*SMALL, *overrides])  # body weights: both read them
    kwargs = network_kwargs(cfg)
    params = inspect.signature(PanopticNet.__init__).parameters
    keywords = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(kwargs) == keywords - {"num_things", "num_classes", "starting_weights"}
    things = sum(1 for c in categories if c["isthing"])
    torch.manual_seed(0)
    direct = PanopticNet(**kwargs, num_things=things, num_classes=len(categories))
    torch.manual_seed(0)
    built = build_model(cfg, categories)
    assert direct.state_dict().keys() == built.state_dict().keys()
    for key, value in built.state_dict().items():
        assert torch.equal(direct.state_dict()[key], value), key
    assert (direct.rpn.cabb, direct.rpn.beta) == (False, DEFAULT_BETA)
    assert (direct.roi_heads.cabb, direct.roi_heads.beta) == (True, 0.25)
    with pytest.raises(TypeError):
        PanopticNet(cfg, things, len(categories))  # no positional settings, no config


def test_crop_aware_heads_take_thresholds_by_keyword():
    """Positional thresholds are easy to swap silently: the heads refuse them."""
    for cls, modules in ((CropAwareRPN, 2), (CropAwareRoIHeads, 3)):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert len(positional) == modules, (cls.__name__, positional)
        assert params[-1].name == "beta" and params[-1].default == DEFAULT_BETA
