"""detloss: object-detection training losses and the target assignment behind them.

Layers (imports go left to right): boxes -> priors -> coders -> matching -> sampling ->
functional -> detectors -> compat. See ``CONTRIBUTING.md`` and ``DESIGN.md``.
"""
__version__ = "0.1.0"

from ._validate import set_value_checks, value_checks_enabled
from .strategy import execution_strategy, get_execution_strategy, set_execution_strategy
from .boxes import (
    aligned_box_iou,
    box_area,
    box_convert,
    box_iou,
    cxcywh_to_xyxy,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from .rotated_boxes import (
    aligned_probiou,
    corners_to_xywhr,
    probiou,
    rotated_box_covariance,
    rotated_gwd,
    rotated_kld,
    xywhr_to_corners,
)
from .coders import (
    encode_corner_offsets,
    decode_boxes,
    decode_deltas,
    decode_landmarks,
    decode_yolo,
    encode_boxes,
    encode_deltas,
    encode_landmarks,
)
from .priors import (
    SSD_PRESETS,
    ssd_keras_anchors,
    SSDPriorConfig,
    anchor_points,
    rcnn_anchors,
    rcnn_base_anchors,
    retinaface_priors,
    retinanet_anchors,
    ssd_priors,
    yolo_grid,
    yolov3_anchors,
)
from .targets import pad_ground_truth
from . import functional

from .matching import (
    GreedyMatch,
    HungarianMatch,
    MaxIoUAssignment,
    PriorMatch,
    ProposalTargets,
    RPNTargets,
    TaskAlignedAssignment,
    YoloAssignment,
    YoloTargets,
    assign_yolo_anchors,
    build_yolo_targets,
    detr_matching_cost,
    greedy_bipartite_match,
    match_greedy,
    match_greedy_boxes,
    match_hungarian,
    match_priors,
    match_rotated_task_aligned,
    match_task_aligned,
    max_iou_match,
    proposal_targets,
    rpn_targets,
)
from .sampling import mine_hard_negatives, mine_hard_negatives_batchwide, sample_balanced, top_k_mask
from .detectors import (
    DETRAssignment,
    DETRLoss,
    RTDETRAssignment,
    RTDETRLoss,
    FasterRCNNLoss,
    MultiBoxAssignment,
    RCNNLoss,
    RetinaFaceLoss,
    RetinaNetAssignment,
    RetinaNetLoss,
    RPNLoss,
    SSDLoss,
    YOLOv3Loss,
    YOLOv3LossAssignment,
    YOLOv8Loss,
    YOLOOBBLoss,
    YOLO26Loss,
    yolo26_branch_weights,
)
