"""The panoptic network: torchvision backbone + FPN shared by Mask R-CNN heads (with CABB in the
RPN and RoI box losses) and a Panoptic-FPN semantic head.

Crops arrive at their final size: the model normalises and pads the batch to the FPN stride but
never resizes, so ground-truth boxes, masks and cut flags stay exactly as the sampler made them.
At inference, full images are padded the same way and predictions come back at input
resolution.

Training returns six named, unweighted losses; weighting happens outside (the training loop's
loss balancing), so that per-term magnitudes can be logged and searched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from cabb_ray.config import ExperimentConfig
from cabb_ray.errors import CabbRayError
from cabb_ray.losses.cabb import DEFAULT_BETA
from cabb_ray.model.backbones import build_backbone
from cabb_ray.model.crop_aware_roi_heads import CropAwareRoIHeads
from cabb_ray.model.crop_aware_rpn import CropAwareRPN
from cabb_ray.model.pretrained import full_network_file, read_full_network_file

# Our name for each training loss, keyed by the name the module computing it returns
# (torchvision's for the RPN and RoI heads): the one mapping, in ``LOSS_TERMS`` order
# (tests/test_model.py checks the values against ``cabb_ray.config.LOSS_TERMS``).
LOSS_NAMES = {
    "loss_objectness": "rpn_objectness",
    "loss_rpn_box_reg": "rpn_box",
    "loss_classifier": "roi_cls",
    "loss_box_reg": "roi_box",
    "loss_mask": "roi_mask",
    "loss_semantic": "semantic",
}
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32
# torchvision's Mask R-CNN values, the same for every preset.
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
RPN_POSITIVE_FRACTION = 0.5
RPN_NMS_THRESHOLD = 0.7
ROI_IOU = (0.5, 0.5)  # proposals above are objects, below background
ROI_POSITIVE_FRACTION = 0.25
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@dataclass(frozen=True)
class Architecture:
    """Sizes that differ between the GPU network and the CPU quickstart network."""

    backbone: str  # a torchvision ResNet or RegNet
    anchor_sizes: tuple[int, ...]  # per FPN level P2..P6
    anchor_scales: int  # sizes per octave: base * 2^(k / scales)
    rpn_iou: tuple[float, float]  # anchors above are objects, below background
    rpn_batch: int
    rpn_pre_nms: tuple[int, int]  # train, test
    rpn_post_nms: tuple[int, int]
    roi_batch: int
    roi_sampling_ratio: int  # RoIAlign samples per bin side (its backward dominates on a CPU)
    box_representation: int
    mask_layers: tuple[int, ...]
    semantic_channels: int
    detections: int


ARCHITECTURES = {
    "resnet50": Architecture(
        backbone="resnet50",
        anchor_sizes=(32, 64, 128, 256, 512),
        anchor_scales=1,
        rpn_iou=(0.7, 0.3),
        rpn_batch=256,
        rpn_pre_nms=(2000, 1000),
        rpn_post_nms=(2000, 1000),
        roi_batch=512,
        roi_sampling_ratio=2,
        box_representation=1024,
        mask_layers=(256, 256, 256, 256),
        semantic_channels=128,
        detections=100,
    ),
    # Quarter-resolution setting (256x512 scenes, 128x128 crops): a RegNetY-400MF body, narrow
    # heads, and anchors that fit small objects: three sizes per octave from 12 px at P2 (stride
    # 4), and a looser foreground IoU, so that most ground-truth boxes have a real anchor match.
    "cpu_small": Architecture(
        backbone="regnet_y_400mf",
        anchor_sizes=(12, 24, 48, 96, 192),
        anchor_scales=3,
        rpn_iou=(0.6, 0.3),
        rpn_batch=128,
        rpn_pre_nms=(600, 300),
        rpn_post_nms=(300, 150),
        roi_batch=128,
        roi_sampling_ratio=1,
        box_representation=128,
        mask_layers=(64, 64),
        semantic_channels=32,
        detections=50,
    ),
}


class SemanticHead(nn.Module):
    """Panoptic FPN semantic branch: each of P2..P5 upsampled to stride 4, summed, classified."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, levels: int = 4):
        super().__init__()

        def block(cin: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, channels, 3, padding=1, bias=False),
                nn.GroupNorm(min(32, channels // 4), channels),
                nn.ReLU(inplace=True),
            )

        self.scales = nn.ModuleList()
        for level in range(levels):
            stages = [block(in_channels)] + [block(channels) for _ in range(max(level - 1, 0))]
            self.scales.append(nn.ModuleList(stages))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Logits at stride 4 (P2's resolution); inputs are padded to the FPN stride."""
        out = None
        for level, (feature, stages) in enumerate(zip(features, self.scales, strict=True)):
            x = feature
            for stage in stages:
                x = stage(x)
                if level > 0:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        return self.classifier(out)


class PanopticNet(nn.Module):
    """Backbone + FPN, CABB-aware Mask R-CNN heads and a semantic head.

    Every setting is an explicit keyword argument, as in torchvision's ``FasterRCNN``;
    ``network_kwargs`` is where an ``ExperimentConfig`` fills them (``build_model``).
    ``preset`` picks the ``ARCHITECTURES`` sizes; ``roi_levels``, ``canonical_scale`` and
    ``canonical_level`` are the RoI poolers' level rule, which ISUS shares
    (``cabb_ray.structures.levels``). ``starting_weights=False`` builds the structure without
    reading ``pretrained``'s body weights.
    """

    def __init__(
        self,
        *,
        num_things: int,
        num_classes: int,
        preset: str,
        pretrained: str,
        fpn_channels: int,
        trainable_backbone_layers: int,
        roi_levels: tuple[int, int],
        canonical_scale: float,
        canonical_level: int,
        detection_score_threshold: float,
        detection_nms_threshold: float,
        cabb_rpn: bool = True,
        cabb_roi: bool = True,
        rpn_beta: float = DEFAULT_BETA,
        roi_beta: float = DEFAULT_BETA,
        starting_weights: bool = True,
    ):
        super().__init__()
        k_min, k_max = roi_levels
        if not 2 <= k_min <= k_max <= 5:
            raise CabbRayError(
                f"model.roi_levels: expected levels within P2..P5, got [{k_min}, {k_max}]"
            )
        self.arch = arch = ARCHITECTURES[preset]
        self.num_things, self.num_classes = num_things, num_classes
        self.backbone = build_backbone(
            arch.backbone,
            preset,
            pretrained,
            fpn_channels,
            trainable_backbone_layers,
            starting_weights,
        )
        channels = self.backbone.out_channels
        octave = tuple(2.0 ** (k / arch.anchor_scales) for k in range(arch.anchor_scales))
        sizes = tuple(tuple(base * f for f in octave) for base in arch.anchor_sizes)
        anchors = AnchorGenerator(sizes, (ANCHOR_RATIOS,) * len(sizes))
        self.rpn = CropAwareRPN(
            anchors,
            RPNHead(channels, len(ANCHOR_RATIOS) * arch.anchor_scales),
            fg_iou_thresh=arch.rpn_iou[0],
            bg_iou_thresh=arch.rpn_iou[1],
            batch_size_per_image=arch.rpn_batch,
            positive_fraction=RPN_POSITIVE_FRACTION,
            pre_nms_top_n=dict(zip(("training", "testing"), arch.rpn_pre_nms, strict=True)),
            post_nms_top_n=dict(zip(("training", "testing"), arch.rpn_post_nms, strict=True)),
            nms_thresh=RPN_NMS_THRESHOLD,
            cabb=cabb_rpn,
            beta=rpn_beta,
        )
        names = [str(level - 2) for level in range(k_min, k_max + 1)]

        def pool(size: int) -> MultiScaleRoIAlign:
            return MultiScaleRoIAlign(
                names,
                size,
                arch.roi_sampling_ratio,
                canonical_scale=canonical_scale,
                canonical_level=canonical_level,
            )

        self.roi_heads = CropAwareRoIHeads(
            pool(7),
            TwoMLPHead(channels * 49, arch.box_representation),
            FastRCNNPredictor(arch.box_representation, num_things + 1),
            fg_iou_thresh=ROI_IOU[0],
            bg_iou_thresh=ROI_IOU[1],
            batch_size_per_image=arch.roi_batch,
            positive_fraction=ROI_POSITIVE_FRACTION,
            bbox_reg_weights=ROI_BOX_WEIGHTS,
            score_thresh=detection_score_threshold,
            nms_thresh=detection_nms_threshold,
            detections_per_img=arch.detections,
            mask_roi_pool=pool(14),
            mask_head=MaskRCNNHeads(channels, arch.mask_layers, 1),
            mask_predictor=MaskRCNNPredictor(
                arch.mask_layers[-1], arch.mask_layers[-1], num_things + 1
            ),
            cabb=cabb_roi,
            beta=roi_beta,
        )
        self.semantic_head = SemanticHead(channels, arch.semantic_channels, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(3, 1, 1), persistent=False)

    def batch(self, images: list[Tensor]) -> ImageList:
        """Normalise and zero-pad to a common size divisible by the FPN stride (no resizing)."""
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        height = -(-max(h for h, _ in sizes) // SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        width = -(-max(w for _, w in sizes) // SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        batch = images[0].new_zeros((len(images), 3, height, width))
        for k, img in enumerate(images):
            batch[k, :, : img.shape[-2], : img.shape[-1]] = (img - self.mean) / self.std
        return ImageList(batch, sizes)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: dict of the six losses. Inference: per image boxes, labels, scores, masks
        (probabilities at input resolution) and semantic logits [C, H, W]."""
        if self.training and targets is None:
            raise ValueError("targets are required in training")
        image_list = self.batch(images)
        features = self.backbone(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(
            features, proposals, image_list.image_sizes, targets
        )
        pyramid = [features[k] for k in list(features)[:4]]
        semantic = F.interpolate(
            self.semantic_head(pyramid),
            size=image_list.tensors.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        if self.training:
            sem_target = torch.full(
                semantic.shape[:1] + semantic.shape[2:],
                255,
                dtype=torch.int64,
                device=semantic.device,
            )
            for k, t in enumerate(targets):
                h, w = t["semantic"].shape
                sem_target[k, :h, :w] = t["semantic"]
            raw = {
                **rpn_losses,
                **roi_losses,
                "loss_semantic": F.cross_entropy(semantic, sem_target, ignore_index=255),
            }
            return {ours: raw[theirs] for theirs, ours in LOSS_NAMES.items()}
        for det, (h, w), sem in zip(detections, image_list.image_sizes, semantic, strict=True):
            det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], (h, w))
            det["semantic"] = sem[:, :h, :w]
        return detections


def network_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """``PanopticNet``'s keyword arguments, except the class counts, from an experiment config:
    the one place the network's config keys are read (detectron2's ``from_config``), so that
    the network itself can be built, and tested, without a config."""
    model, loss, evaluation = cfg.model, cfg.loss, cfg.eval
    return {
        "preset": model.preset,
        "pretrained": model.pretrained,
        "fpn_channels": model.fpn_channels,
        "trainable_backbone_layers": model.trainable_backbone_layers,
        "roi_levels": tuple(model.roi_levels),
        "canonical_scale": model.canonical_scale,
        "canonical_level": model.canonical_level,
        "detection_score_threshold": evaluation.detection_score_threshold,
        "detection_nms_threshold": evaluation.detection_nms_threshold,
        "cabb_rpn": loss.cabb_rpn,
        "cabb_roi": loss.cabb_roi,
        "rpn_beta": loss.rpn_beta,
        "roi_beta": loss.roi_beta,
    }


def build_model(
    cfg: ExperimentConfig, categories: list[dict[str, Any]], starting_weights: bool = True
) -> PanopticNet:
    """The network for a dataset's categories (things become instance labels 1..T), with the
    whole-network pre-trained file ``model.pretrained`` names loaded, if it names one.
    ``starting_weights=False`` builds the same structure without reading or downloading the
    ``model.pretrained`` weights (a checkpoint is about to replace them all)."""
    things = sum(1 for c in categories if c["isthing"])
    if things == 0:
        raise CabbRayError("the dataset has no thing categories; the instance branch needs some")
    kwargs = network_kwargs(cfg)
    model = PanopticNet(
        **kwargs,
        num_things=things,
        num_classes=len(categories),
        starting_weights=starting_weights,
    )
    if starting_weights:
        path = full_network_file(kwargs["pretrained"], kwargs["preset"])
        if path is not None:
            read_full_network_file(path, model, categories)
    return model
