"""Drop-in for Hugging Face transformers' detection loss functions (transformers 5.23.0).

Functions with transformers' names and signatures, returning ``(loss, loss_dict,
auxiliary_outputs)`` as the originals do (``transformers/loss/loss_*.py``), built on
:class:`detloss.detectors.rt_detr.RTDETRLoss`: every decoder layer, query group and image, and
the encoder output, is matched in **one** solve (transformers solves each of them separately,
image by image), the denoising queries take their given positive indices.

Switch a model with one line, ``model.loss_function = LOSS_MAPPING[name]``, or
``use_detloss(model)``. This module never imports transformers: a ``config`` is any object
with the attributes the losses read (listed per function).

Reproduced as the originals do them (quirks included):

* RT-DETR / D-FINE / DEIMv2: the loss dict holds *weighted* terms and the total is their sum;
  the auxiliary outputs are the decoder layers but the last (``_aux_{i}``), then the encoder
  output (``_aux_{n}``); the denoising layers ``_dn_{i}``. D-FINE and DEIMv2 clamp the boxes to
  ``[0, 1]``, give FGL / DDF to the auxiliary and denoising layers only (the layer lists are
  zipped, so the shortest decides how many), and the last denoising layer's DDF is 0 (it is its
  own teacher). DEIMv2 splits off the denoising queries of the final layer only with
  ``auxiliary_loss``.
* DETR, Deformable DETR (Conditional, DAB), LW-DETR / RF-DETR: the loss dict holds *unweighted*
  terms and ``cardinality_error`` (no gradient); the total weighs them (the class term by 1 for
  DETR and Deformable DETR, auxiliary layers up to ``decoder_layers - 1``). RF-DETR matches each of
  its ``group_detr`` query groups one to one, its normaliser is ``objects x groups``.
* Non-finite costs: transformers replaces them by the dtype's largest value; here by
  :data:`detloss.matching.hungarian.NON_FINITE_COST`. Finite costs match identically.

Segmentation losses (masks) are not provided: :class:`NotImplementedError`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._validate import ValueChecks, joined_value_checks, require_tensor
from ..detectors.rt_detr import RTDETRLoss
from ..targets import pad_ground_truth

__all__ = [
    "DFineForObjectDetectionLoss",
    "Deimv2ForObjectDetectionLoss",
    "DeformableDetrForObjectDetectionLoss",
    "DeformableDetrForSegmentationLoss",
    "ForObjectDetectionLoss",
    "ForSegmentationLoss",
    "LOSS_MAPPING",
    "LwDetrForObjectDetectionLoss",
    "RTDetrForObjectDetectionLoss",
    "RfDetrForSegmentationLoss",
    "use_detloss",
]


# --------------------------------------------------------------------------------- inputs
def _ground_truth(labels: Sequence[Mapping], like: Tensor, checks: ValueChecks) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """transformers' targets (``{"class_labels" (n,), "boxes" (n, 4) cxcywh}`` per image) ->
    padded ``(boxes (B, M, 4), labels (B, M), valid (B, M), counts)`` on ``like``'s device (value
    checks queued on ``checks``, read with the loss's)."""
    if labels is None or isinstance(labels, (Tensor, Mapping)):
        raise ValueError(f"labels: expected a list of dicts, one per image, got {type(labels).__name__}")
    boxes, classes = [], []
    for i, t in enumerate(labels):
        if not isinstance(t, Mapping) or "class_labels" not in t or "boxes" not in t:
            raise ValueError(f'labels[{i}]: expected a dict with "class_labels" and "boxes"')
        boxes.append(require_tensor(t["boxes"], f'labels[{i}]["boxes"]').to(like.device, torch.float32))
        classes.append(require_tensor(t["class_labels"], f'labels[{i}]["class_labels"]').to(like.device).long())
    if len(boxes) != like.shape[0]:
        raise ValueError(f"labels: expected one dict per image ({like.shape[0]}), got {len(boxes)}")
    for i, (b, c) in enumerate(zip(boxes, classes)):
        if b.dim() != 2 or b.shape[-1] != 4 or c.shape != b.shape[:1]:
            raise ValueError(f'labels[{i}]: expected "boxes" (n, 4) and "class_labels" (n,), got {tuple(b.shape)} and {tuple(c.shape)}')
    counts = [int(b.shape[0]) for b in boxes]
    gt_boxes, gt_labels, gt_valid = pad_ground_truth(boxes, classes, checks=checks)
    return gt_boxes.to(like.device), gt_labels.to(like.device), gt_valid.to(like.device), counts


def _denoising(meta: Mapping, counts: list[int], total_queries: int, device: torch.device,
               checks: ValueChecks) -> tuple[Tensor, int, list[int]]:
    """``denoising_meta_values`` -> ``(dn_query_to_gt (B, D), groups, [D, Q])``, checked against
    the query count and the objects of each image (index values queued on ``checks``)."""
    for key in ("dn_positive_idx", "dn_num_group", "dn_num_split"):
        if not isinstance(meta, Mapping) or key not in meta:
            raise ValueError(f'denoising_meta_values: expected a dict with "{key}", got {meta!r:.80}')
    split = [int(x) for x in meta["dn_num_split"]]
    groups = int(meta["dn_num_group"])
    if len(split) != 2 or sum(split) != total_queries or min(split) < 0:
        raise ValueError(
            f'denoising_meta_values["dn_num_split"]: expected [denoising, matching] queries adding up to the '
            f"{total_queries} queries of the predictions, got {split}"
        )
    positive = list(meta["dn_positive_idx"])
    if len(positive) != len(counts):
        raise ValueError(f'denoising_meta_values["dn_positive_idx"]: expected one tensor per image ({len(counts)}), got {len(positive)}')
    d = split[0]
    q2g = torch.full((len(counts), d), -1, dtype=torch.int64, device=device)
    indices = []
    for b, (idx, n) in enumerate(zip(positive, counts)):
        idx = torch.as_tensor(idx, device=device).long().reshape(-1)
        if n == 0:
            continue
        if idx.numel() != groups * n:
            raise ValueError(
                f'denoising_meta_values["dn_positive_idx"][{b}]: expected dn_num_group x objects = {groups} x {n} '
                f"indices, got {idx.numel()}"
            )
        indices.append((b, idx, n))
        checks.in_range(idx, f'denoising_meta_values["dn_positive_idx"][{b}]', 0, d - 1)
    for b, idx, n in indices:  # (clamped: an index out of range raises at the loss's one read)
        q2g[b].scatter_(0, idx.clamp(0, max(d - 1, 0)), torch.arange(n, device=device).repeat(groups))
    return q2g, groups, split


def _layers(x: Optional[Tensor], name: str) -> Tensor:
    if x is None:
        raise ValueError(f"{name}: expected the per-layer predictions (auxiliary_loss is on), got None")
    return require_tensor(x, name)


def _stack_final(aux: Tensor, final: Tensor) -> Tensor:
    """``(n, B, Q, ...)`` auxiliary layers + ``(B, Q, ...)`` final -> ``(n + 1, B, Q, ...)``."""
    return torch.cat((aux, final.unsqueeze(0)), 0) if aux.shape[0] else final.unsqueeze(0)


def _cardinality(logits: Tensor, counts: Tensor, softmax: bool) -> Tensor:
    """transformers' ``cardinality_error`` of ``(B, Q, K)`` logits (no gradient)."""
    with torch.no_grad():
        if softmax:
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        else:
            predicted = (logits.sigmoid().max(-1).values > 0.5).sum(1)
        return (predicted.float() - counts.float()).abs().mean()


# ------------------------------------------------------------------- RT-DETR, D-FINE, DEIMv2
def _rt_family(kind: str, logits, labels, device, pred_boxes, config, outputs_class, outputs_coord,
               enc_topk_logits, enc_topk_bboxes, denoising_meta_values, predicted_corners,
               initial_reference_points) -> tuple[Tensor, dict, Optional[list]]:
    logits, pred_boxes = require_tensor(logits, "logits"), require_tensor(pred_boxes, "pred_boxes")
    if not getattr(config, "use_focal_loss", True):
        raise NotImplementedError("config.use_focal_loss=False (softmax matching of the RT-DETR family) is not provided by detloss")
    local = kind != "rt_detr"
    class_name = "mal" if kind == "deimv2" else "vfl"
    clamp = (lambda t: t.clamp(min=0, max=1)) if local else (lambda t: t)  # noqa: E731
    with joined_value_checks() as checks:  # the wrapper's checks join the loss's one host read
        return _rt_family_checked(kind, logits, pred_boxes, labels, config, outputs_class, outputs_coord,
                                  enc_topk_logits, enc_topk_bboxes, denoising_meta_values, predicted_corners,
                                  initial_reference_points, class_name, local, clamp, checks)


def _rt_family_checked(kind, logits, pred_boxes, labels, config, outputs_class, outputs_coord, enc_topk_logits,
                       enc_topk_bboxes, denoising_meta_values, predicted_corners, initial_reference_points,
                       class_name, local, clamp, checks):
    gt_boxes, gt_labels, gt_valid, counts = _ground_truth(labels, logits, checks)
    meta, aux = denoising_meta_values, bool(config.auxiliary_loss)
    # 1. the final layer (denoising queries split off; DEIMv2 does it only with auxiliary_loss)
    final_logits, final_boxes = logits, pred_boxes
    dn = None
    if meta is not None:
        dn = _denoising(meta, counts, logits.shape[1], logits.device, checks)
        if kind != "deimv2" or aux:
            _, final_logits = torch.split(logits, dn[2], dim=1)
            _, final_boxes = torch.split(pred_boxes, dn[2], dim=1)
    final_boxes = clamp(final_boxes)
    kw: dict = {}
    n_aux, n_dn = 0, 0
    if aux:
        # 2. the auxiliary layers (B, L, Q, ...) -> (L, B, Q, ...), zipped as transformers does
        coord, cls = clamp(_layers(outputs_coord, "outputs_coord")), _layers(outputs_class, "outputs_class")
        parts = [coord, cls]
        if local:
            parts += [_layers(predicted_corners, "predicted_corners"), _layers(initial_reference_points, "initial_reference_points")]
        if dn is not None:
            dn_parts, parts = zip(*[torch.split(p, dn[2], dim=2) for p in parts])
        n_aux = min(p.shape[1] for p in parts) - 1
        box_pred = _stack_final(parts[0][:, :n_aux].transpose(0, 1), final_boxes)
        cls_logits = _stack_final(parts[1][:, :n_aux].transpose(0, 1), final_logits)
        if local:
            kw.update(pred_corners=parts[2][:, :n_aux].transpose(0, 1), ref_points=parts[3][:, :n_aux].transpose(0, 1),
                      teacher_corners=parts[2][:, -1], teacher_logits=parts[1][:, -1])
            if n_aux == 0:
                kw = {}
        kw.update(enc_box_pred=clamp(_layers(enc_topk_bboxes, "enc_topk_bboxes")),
                  enc_cls_logits=_layers(enc_topk_logits, "enc_topk_logits"))
        if dn is not None:
            n_dn = min(p.shape[1] for p in dn_parts)
            kw.update(dn_box_pred=dn_parts[0][:, :n_dn].transpose(0, 1), dn_cls_logits=dn_parts[1][:, :n_dn].transpose(0, 1),
                      dn_query_to_gt=dn[0], dn_groups=dn[1])
            if local and n_dn:
                kw.update(dn_pred_corners=dn_parts[2][:, :n_dn].transpose(0, 1),
                          dn_ref_points=dn_parts[3][:, :n_dn].transpose(0, 1), dn_teacher_logits=dn_parts[1][:, -1])
                if n_dn != dn_parts[2].shape[1]:
                    kw["dn_teacher_corners"] = dn_parts[2][:, -1]
            if n_dn == 0:
                for key in ("dn_box_pred", "dn_cls_logits", "dn_query_to_gt", "dn_groups"):
                    kw.pop(key)
    else:
        box_pred, cls_logits = final_boxes.unsqueeze(0), final_logits.unsqueeze(0)
    # 3. one RTDETRLoss call: every layer, the encoder output and the denoising layers
    criterion = RTDETRLoss(
        int(config.num_labels), class_loss=class_name, alpha=float(config.focal_loss_alpha),
        gamma=float(config.focal_loss_gamma), mal_alpha=getattr(config, "mal_alpha", None),
        match_class_cost="focal", match_cls_weight=float(config.matcher_class_cost),
        match_l1_weight=float(config.matcher_bbox_cost), match_giou_weight=float(config.matcher_giou_cost),
        match_alpha=float(config.matcher_alpha), match_gamma=float(config.matcher_gamma),
        dense_one_to_one=kind == "deimv2" and bool(getattr(config, "use_dense_one_to_one", False)),
        **(dict(max_num_bins=int(config.max_num_bins), up=float(config.up), reg_scale=float(config.reg_scale)) if local else {}),
    )
    out = criterion(box_pred, cls_logits, gt_boxes, gt_labels, gt_valid, **kw)
    # 4. transformers' names, weighted terms, total = their sum
    weight = {"cls": float(getattr(config, f"weight_loss_{class_name}")), "l1": float(config.weight_loss_bbox),
              "giou": float(config.weight_loss_giou)}
    if local:
        weight.update(fgl=float(config.weight_loss_fgl), ddf=float(config.weight_loss_ddf))
    names = {"cls": class_name, "l1": "bbox", "giou": "giou", "fgl": "fgl", "ddf": "ddf"}
    loss_dict = {}
    for key, value in out.items():
        if key == "loss":
            continue
        term, suffix = key.split("_", 2)[1], key[len("loss_") + len(key.split("_", 2)[1]):]
        if suffix == "_enc":
            suffix = f"_aux_{n_aux}"
        elif suffix and not suffix.startswith("_dn_"):
            suffix = "_aux" + suffix
        loss_dict[f"loss_{names[term]}{suffix}"] = value * weight[term]
    loss = sum(loss_dict.values())
    auxiliary_outputs = None
    if aux:
        auxiliary_outputs = _auxiliary_outputs(kind, cls_logits[:-1], box_pred[:-1], kw, n_aux)
    return loss, loss_dict, auxiliary_outputs


def _auxiliary_outputs(kind, cls_logits, box_pred, kw, n_aux) -> list:
    """What transformers returns as ``auxiliary_outputs``: one dict per auxiliary layer, then
    the encoder output."""
    if kind == "rt_detr" or "pred_corners" not in kw:
        layers = [{"logits": a, "pred_boxes": b} for a, b in zip(cls_logits, box_pred)]
    else:
        layers = [
            {"logits": a, "pred_boxes": b, "pred_corners": c, "ref_points": d, "teacher_corners": kw["teacher_corners"],
             "teacher_logits": kw["teacher_logits"]}
            for a, b, c, d in zip(cls_logits, box_pred, kw["pred_corners"], kw["ref_points"])
        ]
    return layers + [{"logits": kw["enc_cls_logits"], "pred_boxes": kw["enc_box_pred"]}]


def RTDetrForObjectDetectionLoss(
    logits: Tensor, labels: Sequence[Mapping], device: Any, pred_boxes: Tensor, config: Any,
    outputs_class: Optional[Tensor] = None, outputs_coord: Optional[Tensor] = None,
    enc_topk_logits: Optional[Tensor] = None, enc_topk_bboxes: Optional[Tensor] = None,
    denoising_meta_values: Optional[dict] = None, **kwargs: Any,
) -> tuple[Tensor, dict, Optional[list]]:
    """transformers' ``RTDetrForObjectDetectionLoss`` (RT-DETR v1 and v2).

    ``logits (B, Dn + Q, C)``, ``pred_boxes (B, Dn + Q, 4)`` cxcywh of the final layer;
    ``outputs_class (B, L, Dn + Q, C)``, ``outputs_coord (B, L, Dn + Q, 4)`` every decoder
    layer; ``enc_topk_logits (B, Qe, C)``, ``enc_topk_bboxes (B, Qe, 4)``;
    ``denoising_meta_values`` ``{"dn_positive_idx", "dn_num_group", "dn_num_split"}``.
    Config attributes: ``num_labels``, ``auxiliary_loss``, ``use_focal_loss``,
    ``focal_loss_alpha``, ``focal_loss_gamma``, ``matcher_alpha``, ``matcher_gamma``,
    ``matcher_class_cost``, ``matcher_bbox_cost``, ``matcher_giou_cost``, ``weight_loss_vfl``,
    ``weight_loss_bbox``, ``weight_loss_giou``.
    """
    return _rt_family("rt_detr", logits, labels, device, pred_boxes, config, outputs_class, outputs_coord,
                      enc_topk_logits, enc_topk_bboxes, denoising_meta_values, None, None)


def DFineForObjectDetectionLoss(
    logits: Tensor, labels: Sequence[Mapping], device: Any, pred_boxes: Tensor, config: Any,
    outputs_class: Optional[Tensor] = None, outputs_coord: Optional[Tensor] = None,
    enc_topk_logits: Optional[Tensor] = None, enc_topk_bboxes: Optional[Tensor] = None,
    denoising_meta_values: Optional[dict] = None, predicted_corners: Optional[Tensor] = None,
    initial_reference_points: Optional[Tensor] = None, **kwargs: Any,
) -> tuple[Tensor, dict, Optional[list]]:
    """transformers' ``DFineForObjectDetectionLoss``: RT-DETR's arguments plus
    ``predicted_corners (B, L, Dn + Q, 4 (max_num_bins + 1))`` and ``initial_reference_points
    (B, L, Dn + Q, 4)``; config also ``weight_loss_fgl``, ``weight_loss_ddf``, ``max_num_bins``,
    ``up``, ``reg_scale``."""
    return _rt_family("d_fine", logits, labels, device, pred_boxes, config, outputs_class, outputs_coord,
                      enc_topk_logits, enc_topk_bboxes, denoising_meta_values, predicted_corners,
                      initial_reference_points)


def Deimv2ForObjectDetectionLoss(
    logits: Tensor, labels: Sequence[Mapping], device: Any, pred_boxes: Tensor, config: Any,
    outputs_class: Optional[Tensor] = None, outputs_coord: Optional[Tensor] = None,
    enc_topk_logits: Optional[Tensor] = None, enc_topk_bboxes: Optional[Tensor] = None,
    denoising_meta_values: Optional[dict] = None, predicted_corners: Optional[Tensor] = None,
    initial_reference_points: Optional[Tensor] = None, **kwargs: Any,
) -> tuple[Tensor, dict, Optional[list]]:
    """transformers' ``Deimv2ForObjectDetectionLoss``: D-FINE's arguments, MAL class term
    (config ``weight_loss_mal``, ``mal_alpha``), ``use_dense_one_to_one``."""
    return _rt_family("deimv2", logits, labels, device, pred_boxes, config, outputs_class, outputs_coord,
                      enc_topk_logits, enc_topk_bboxes, denoising_meta_values, predicted_corners,
                      initial_reference_points)


# ------------------------------------------------------------ DETR, Deformable DETR, LW-DETR
def _set_family(kind: str, logits, labels, pred_boxes, config, outputs_class, outputs_coord,
                enc_logits=None, enc_boxes=None) -> tuple[Tensor, dict, Optional[list]]:
    logits, pred_boxes = require_tensor(logits, "logits"), require_tensor(pred_boxes, "pred_boxes")
    with joined_value_checks() as checks:  # the wrapper's checks join the loss's one host read
        return _set_family_checked(kind, logits, labels, pred_boxes, config, outputs_class, outputs_coord,
                                   enc_logits, enc_boxes, checks)


def _set_family_checked(kind, logits, labels, pred_boxes, config, outputs_class, outputs_coord, enc_logits,
                        enc_boxes, checks):
    gt_boxes, gt_labels, gt_valid, counts = _ground_truth(labels, logits, checks)
    box_pred, cls_logits = pred_boxes.unsqueeze(0), logits.unsqueeze(0)
    auxiliary_outputs = None
    if config.auxiliary_loss:
        aux_cls, aux_box = _layers(outputs_class, "outputs_class")[:-1], _layers(outputs_coord, "outputs_coord")[:-1]
        n = min(aux_cls.shape[0], aux_box.shape[0])
        aux_cls, aux_box = aux_cls[:n], aux_box[:n]
        auxiliary_outputs = [{"logits": a, "pred_boxes": b} for a, b in zip(aux_cls, aux_box)]
        box_pred, cls_logits = _stack_final(aux_box, pred_boxes), _stack_final(aux_cls, logits)
    options: dict = dict(match_cls_weight=float(config.class_cost), match_l1_weight=float(config.bbox_cost),
                         match_giou_weight=float(config.giou_cost), match_alpha=0.25, match_gamma=2.0)
    kw: dict = {}
    if kind == "detr":
        options.update(class_loss="ce", eos_coef=float(config.eos_coefficient), match_class_cost="softmax")
        num_classes = int(config.num_labels)
    elif kind == "deformable":
        options.update(class_loss="focal", alpha=float(config.focal_alpha), gamma=2.0)
        num_classes = int(config.num_labels)
    else:  # LW-DETR / RF-DETR: query groups, encoder output, all-reduced normaliser
        options.update(class_loss="ia_bce", alpha=float(config.focal_alpha), gamma=2.0,
                       num_groups=int(config.group_detr), distributed=dist.is_available() and dist.is_initialized())
        num_classes = int(config.num_labels)
        kw.update(enc_box_pred=_layers(enc_boxes, "enc_outputs_coord"), enc_cls_logits=_layers(enc_logits, "enc_outputs_class"))
    criterion = RTDETRLoss(num_classes, **options)
    out = criterion(box_pred, cls_logits, gt_boxes, gt_labels, gt_valid, **kw)
    # transformers' names (unweighted), cardinality errors, the weighted total
    names = {"cls": "ce", "l1": "bbox", "giou": "giou"}
    counts_t = torch.tensor(counts, device=logits.device)
    loss_dict: dict = {}
    num_layers = box_pred.shape[0]
    sets = [("", cls_logits[-1])] + [(f"_{i}", cls_logits[i]) for i in range(num_layers - 1)]
    if "enc_cls_logits" in kw:
        sets.append(("_enc", kw["enc_cls_logits"]))
    for suffix, layer_logits in sets:
        for term in ("cls", "l1", "giou"):
            loss_dict[f"loss_{names[term]}{suffix}"] = out[f"loss_{term}{suffix}"]
        loss_dict["cardinality_error" + suffix] = _cardinality(layer_logits, counts_t, softmax=kind == "detr")
    weight_dict = {"loss_ce": float(config.class_loss_coefficient) if kind == "lw_detr" else 1.0,
                   "loss_bbox": float(config.bbox_loss_coefficient), "loss_giou": float(config.giou_loss_coefficient)}
    if config.auxiliary_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(int(config.decoder_layers) - 1) for k, v in list(weight_dict.items())
                            if not k[-1].isdigit()})
    if kind == "lw_detr":
        weight_dict.update({k + "_enc": v for k, v in list(weight_dict.items())})
    loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
    return loss, loss_dict, auxiliary_outputs


def ForObjectDetectionLoss(
    logits: Tensor, labels: Sequence[Mapping], device: Any, pred_boxes: Tensor, config: Any,
    outputs_class: Optional[Tensor] = None, outputs_coord: Optional[Tensor] = None, **kwargs: Any,
) -> tuple[Tensor, dict, Optional[list]]:
    """transformers' ``ForObjectDetectionLoss`` (DETR's ``loss_type``): ``logits (B, Q, C + 1)``,
    ``pred_boxes (B, Q, 4)``, ``outputs_class (L, B, Q, C + 1)`` / ``outputs_coord (L, B, Q, 4)``
    every decoder layer (the last is the final one). Config: ``num_labels``, ``auxiliary_loss``,
    ``decoder_layers``, ``eos_coefficient``, ``class_cost``, ``bbox_cost``, ``giou_cost``,
    ``bbox_loss_coefficient``, ``giou_loss_coefficient``."""
    return _set_family("detr", logits, labels, pred_boxes, config, outputs_class, outputs_coord)


def DeformableDetrForObjectDetectionLoss(
    logits: Tensor, labels: Sequence[Mapping], device: Any, pred_boxes: Tensor, config: Any,
    outputs_class: Optional[Tensor] = None, outputs_coord: Optional[Tensor] = None, **kwargs: Any,
) -> tuple[Tensor, dict, Optional[list]]:
    """transformers' ``DeformableDetrForObjectDetectionLoss`` (also Conditional DETR, DAB-DETR):
    as :func:`ForObjectDetectionLoss` with ``C`` sigmoid columns, focal class term
    (``focal_alpha``, gamma 2) and focal matching cost (alpha 0.25, gamma 2)."""
    return _set_family("deformable", logits, labels, pred_boxes, config, outputs_class, outputs_coord)


def LwDetrForObjectDetectionLoss(
    logits: Tensor, labels: Sequence[Mapping], device: Any, pred_boxes: Tensor, config: Any,
    outputs_class: Optional[Tensor] = None, outputs_coord: Optional[Tensor] = None,
    enc_outputs_class: Optional[Tensor] = None, enc_outputs_coord: Optional[Tensor] = None, **kwargs: Any,
) -> tuple[Tensor, dict, Optional[list]]:
    """transformers' ``LwDetrForObjectDetectionLoss`` (LW-DETR and RF-DETR): ``logits (B, G Q,
    C)``, ``pred_boxes (B, G Q, 4)`` with ``G = config.group_detr`` query groups,
    ``outputs_class (L, B, G Q, C)``, ``outputs_coord``, ``enc_outputs_class (B, G Qe, C)``,
    ``enc_outputs_coord``. IoU-aware BCE class term (``focal_alpha``); config also
    ``class_loss_coefficient``."""
    return _set_family("lw_detr", logits, labels, pred_boxes, config, outputs_class, outputs_coord,
                       enc_outputs_class, enc_outputs_coord)


def _segmentation(name: str) -> Callable:
    def loss(*args: Any, **kwargs: Any):
        raise NotImplementedError(f"{name}: the segmentation (mask) losses are not provided by detloss")

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = f"transformers' ``{name}``: not provided (raises :class:`NotImplementedError`)."
    return loss


ForSegmentationLoss = _segmentation("ForSegmentationLoss")
DeformableDetrForSegmentationLoss = _segmentation("DeformableDetrForSegmentationLoss")
RfDetrForSegmentationLoss = _segmentation("RfDetrForSegmentationLoss")

#: transformers' ``LOSS_MAPPING`` detection keys -> detloss's drop-ins
LOSS_MAPPING: dict[str, Callable] = {
    "ForObjectDetection": ForObjectDetectionLoss,
    "DeformableDetrForObjectDetection": DeformableDetrForObjectDetectionLoss,
    "ConditionalDetrForObjectDetection": DeformableDetrForObjectDetectionLoss,
    "DabDetrForObjectDetection": DeformableDetrForObjectDetectionLoss,
    "RTDetrForObjectDetection": RTDetrForObjectDetectionLoss,
    "RTDetrV2ForObjectDetection": RTDetrForObjectDetectionLoss,
    "DFineForObjectDetection": DFineForObjectDetectionLoss,
    "Deimv2ForObjectDetection": Deimv2ForObjectDetectionLoss,
    "LwDetrForObjectDetection": LwDetrForObjectDetectionLoss,
    "RfDetrForObjectDetection": LwDetrForObjectDetectionLoss,
}
_SEGMENTATION = ("ForSegmentation", "ConditionalDetrForSegmentation", "RfDetrForInstanceSegmentation",
                 "DetrForSegmentation", "DeformableDetrForSegmentation")


def use_detloss(model: Any) -> Callable:
    """Switch a transformers detection model to detloss: sets ``model.loss_function`` to the
    drop-in for its class (or its ``loss_type``, as DETR's ``"ForObjectDetection"``) and returns
    it. Raises ``ValueError`` for a model class this module does not cover and
    ``NotImplementedError`` for segmentation models."""
    name = type(model).__name__
    keys = [name, getattr(model, "loss_type", None)]
    if any(k in _SEGMENTATION or (isinstance(k, str) and k.endswith("Segmentation")) for k in keys if k):
        raise NotImplementedError(f"model: {name} trains with segmentation (mask) losses, which detloss does not provide")
    for key in keys:
        if isinstance(key, str) and key in LOSS_MAPPING:
            model.loss_function = LOSS_MAPPING[key]
            return LOSS_MAPPING[key]
    raise ValueError(
        f"model: expected a model class (or loss_type) among {sorted(LOSS_MAPPING)}, got {name} "
        f"(loss_type={getattr(model, 'loss_type', None)!r}); detloss has no drop-in for it"
    )

