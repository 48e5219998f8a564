"""torchvision's RegionProposalNetwork with the crop-aware box loss.

Only two hooks change: ``assign_targets_to_anchors`` also gathers each anchor's matched
ground-truth cut flags, and ``compute_loss`` scores the sampled positive anchors with
``crop_aware_smooth_l1`` (RPN box coder weights (1, 1, 1, 1)). With CABB off, or nothing cut,
both reproduce torchvision's computation exactly, random sampling included.

With CABB on, the box a cut side is regressed towards is the crop border, not the edge of the
visible mask (paper Sec. 2.4: the cropped box is the object's box clipped to the crop). The two
differ when something occludes the object at the border; matching anchors to objects still
uses the mask box, as without CABB.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork

from cabb_ray.losses.cabb import DEFAULT_BETA, crop_aware_smooth_l1


class CropAwareRPN(RegionProposalNetwork):
    """RPN whose box loss lets cut sides of ground-truth boxes move outward.

    The arguments are torchvision's ``RegionProposalNetwork``'s, by keyword (positional
    thresholds are easy to swap), plus the CABB switch and the smooth-L1 ``beta``.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: nn.Module,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        cabb: bool = True,
        beta: float = DEFAULT_BETA,
    ):
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n=pre_nms_top_n,
            post_nms_top_n=post_nms_top_n,
            nms_thresh=nms_thresh,
            score_thresh=score_thresh,
        )
        self.cabb = cabb
        self.beta = beta
        self._matched_cut: list[Tensor] = []

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        # torchvision's matching loop, plus the matched cut flags (needed for CABB).
        labels, matched_gt_boxes, self._matched_cut = [], [], []
        for anchors_per_image, target in zip(anchors, targets, strict=True):
            gt_boxes = target["boxes"]
            device = anchors_per_image.device
            count = anchors_per_image.shape[0]
            if gt_boxes.numel() == 0:
                matched = torch.zeros(anchors_per_image.shape, dtype=torch.float32, device=device)
                labels_per_image = torch.zeros((count,), dtype=torch.float32, device=device)
                cut = torch.zeros((count, 4), dtype=torch.bool, device=device)
            else:
                quality = self.box_similarity(gt_boxes, anchors_per_image)
                matched_idxs = self.proposal_matcher(quality)
                regressed = cabb_target_boxes(target, gt_boxes) if self.cabb else gt_boxes
                matched = regressed[matched_idxs.clamp(min=0)]
                cut = _cut_of(target, gt_boxes)[matched_idxs.clamp(min=0)]
                labels_per_image = (matched_idxs >= 0).to(dtype=torch.float32)
                labels_per_image[matched_idxs == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
                labels_per_image[matched_idxs == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(labels_per_image)
            matched_gt_boxes.append(matched)
            self._matched_cut.append(cut)
        return labels, matched_gt_boxes

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos_inds = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled_neg_inds = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds], dim=0)
        objectness = objectness.flatten()
        labels_all = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        pred = pred_bbox_deltas[sampled_pos_inds]
        if self.cabb:
            cut = torch.cat(self._matched_cut, dim=0)[sampled_pos_inds]
            box_sum = crop_aware_smooth_l1(
                pred, targets[sampled_pos_inds], cut, self.box_coder.weights, self.beta
            )
        else:
            box_sum = F.smooth_l1_loss(
                pred, targets[sampled_pos_inds], beta=self.beta, reduction="sum"
            )
        box_loss = box_sum / sampled_inds.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness[sampled_inds], labels_all[sampled_inds]
        )
        return objectness_loss, box_loss


def _cut_of(target: dict[str, Tensor], gt_boxes: Tensor) -> Tensor:
    """The target's cut flags, or all False when a target carries none (full images)."""
    cut = target.get("cut")
    if cut is None:
        return torch.zeros((gt_boxes.shape[0], 4), dtype=torch.bool, device=gt_boxes.device)
    return cut.to(device=gt_boxes.device, dtype=torch.bool)


def cabb_target_boxes(target: dict[str, Tensor], gt_boxes: Tensor) -> Tensor:
    """The boxes CABB regresses towards: ``gt_boxes`` with each cut side on the crop border.

    A cut side's mask edge can stop inside the crop (an occluder at the border); the cropped
    box of the whole object still reaches the border there. The crop's size is its masks'.
    """
    cut = _cut_of(target, gt_boxes)
    masks = target.get("masks")
    if masks is None or not bool(cut.any()):
        return gt_boxes
    height, width = masks.shape[-2:]
    border = gt_boxes.new_tensor([0.0, 0.0, float(width), float(height)]).expand_as(gt_boxes)
    return torch.where(cut, border, gt_boxes)
