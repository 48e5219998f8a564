"""torchvision's RoIHeads (box + mask) with the crop-aware box loss.

``select_training_samples`` is torchvision's; the cut flags of each sampled proposal's matched
ground truth are gathered from its ``matched_idxs``. ``forward`` is the box and mask part of
torchvision's (keypoints are not used here), because its box loss is a module-level function
with no hook: the only difference is ``crop_aware_smooth_l1`` (RoI box coder weights, e.g.
(10, 10, 5, 5)) in place of smooth-L1 when CABB is on. With CABB off it calls torchvision's
``fastrcnn_loss`` itself, so the losses are torchvision's exactly. With CABB on, positive
proposals are regressed towards the box whose cut sides lie on the crop border
(``cabb_target_boxes``); proposals are still matched and sampled on the mask box.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
)

from cabb_ray.losses.cabb import DEFAULT_BETA, crop_aware_smooth_l1
from cabb_ray.model.crop_aware_rpn import _cut_of, cabb_target_boxes


class CropAwareRoIHeads(RoIHeads):
    """Box and mask heads whose box loss lets cut sides of ground-truth boxes move outward.

    The arguments are torchvision's ``RoIHeads``'s, by keyword; the mask branch is required
    (``forward`` always runs it) and keypoints are not supported. ``cabb`` and ``beta`` set the
    box loss.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: tuple[float, float, float, float] | None,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        mask_roi_pool: nn.Module,
        mask_head: nn.Module,
        mask_predictor: nn.Module,
        cabb: bool = True,
        beta: float = DEFAULT_BETA,
    ):
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            bbox_reg_weights=bbox_reg_weights,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        self.cabb = cabb
        self.beta = beta

    def box_loss(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
        cuts: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        if not self.cabb and self.beta == DEFAULT_BETA:  # torchvision's loss hard-codes 1/9
            return fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        labels_all = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        classification = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        n = class_logits.shape[0]
        pred = box_regression.reshape(n, box_regression.size(-1) // 4, 4)[pos, labels_all[pos]]
        if self.cabb:
            cut = torch.cat(cuts, dim=0)[pos]
            box_sum = crop_aware_smooth_l1(
                pred, targets[pos], cut, self.box_coder.weights, self.beta
            )
        else:
            box_sum = F.smooth_l1_loss(pred, targets[pos], beta=self.beta, reduction="sum")
        return classification, box_sum / labels_all.numel()

    def crop_aware_regression_targets(
        self,
        targets: list[dict[str, Tensor]],
        matched_idxs: list[Tensor],
        proposals: list[Tensor],
        cuts: list[Tensor],
        regression_targets: list[Tensor],
    ) -> list[Tensor]:
        """Encoded targets towards ``cabb_target_boxes`` (cut sides on the crop border);
        images with nothing cut keep torchvision's targets."""
        return [
            self.box_coder.encode_single(cabb_target_boxes(t, t["boxes"])[m], p)
            if t["boxes"].numel() and bool(c.any())
            else r
            for t, m, p, c, r in zip(
                targets, matched_idxs, proposals, cuts, regression_targets, strict=True
            )
        ]

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        result: list[dict[str, Tensor]] = []
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets
            )
            cuts = [
                _cut_of(t, t["boxes"])[m]
                if t["boxes"].numel()
                else torch.zeros((len(m), 4), dtype=torch.bool, device=m.device)
                for t, m in zip(targets, matched_idxs, strict=True)
            ]
            if self.cabb:
                regression_targets = self.crop_aware_regression_targets(
                    targets, matched_idxs, proposals, cuts, regression_targets
                )
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_classifier, loss_box_reg = self.box_loss(
                class_logits, box_regression, labels, regression_targets, cuts
            )
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            positive = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[k] for p, k in zip(proposals, positive, strict=True)]
            pos_matched = [m[k] for m, k in zip(matched_idxs, positive, strict=True)]
        else:
            boxes, scores, det_labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes
            )
            result = [
                {"boxes": b, "labels": lab, "scores": s}
                for b, lab, s in zip(boxes, det_labels, scores, strict=True)
            ]
            mask_proposals = [r["boxes"] for r in result]
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        )
        if self.training:
            losses["loss_mask"] = maskrcnn_loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                pos_matched,
            )
        else:
            probs = maskrcnn_inference(mask_logits, [r["labels"] for r in result])
            for prob, r in zip(probs, result, strict=True):
                r["masks"] = prob
        return result, losses
