"""Element-wise detection losses, each with ``weight``, ``reduction`` and ``normalizer``.

Weights, reductions and the positive-count normaliser are implemented once in
:mod:`detloss.functional.reduce`; every loss here computes its element-wise value and
hands it over.
"""
from .classification import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    objectness_loss,
    probability_cross_entropy,
    sigmoid_focal_loss,
    softmax_focal_loss,
)
from .dice import dice_loss
from .detr_terms import (
    decoupled_distillation_loss,
    detr_varifocal_loss,
    fine_grained_localization_loss,
    iou_aware_bce_loss,
    matchability_aware_loss,
    weighting_function,
)
from .distribution import distribution_focal_loss, quality_focal_loss, varifocal_loss
from .iou import iou_loss
from .reduce import positive_normalizer, weighted_reduce
from .regression import inside_outside_smooth_l1, l1_loss, smooth_l1_loss, smooth_l1_sum

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "decoupled_distillation_loss",
    "detr_varifocal_loss",
    "dice_loss",
    "distribution_focal_loss",
    "fine_grained_localization_loss",
    "iou_aware_bce_loss",
    "inside_outside_smooth_l1",
    "iou_loss",
    "l1_loss",
    "matchability_aware_loss",
    "objectness_loss",
    "positive_normalizer",
    "probability_cross_entropy",
    "quality_focal_loss",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "smooth_l1_sum",
    "softmax_focal_loss",
    "varifocal_loss",
    "weighted_reduce",
    "weighting_function",
]
