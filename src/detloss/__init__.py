"""detloss: object-detection training losses and the target assignment behind them.

Layers (imports go left to right): boxes -> priors -> coders -> matching -> sampling ->
functional -> detectors -> compat. See ``CONTRIBUTING.md`` and ``DESIGN.md``.
"""
__version__ = "0.1.0"

from ._validate import set_value_checks
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
from .coders import (
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
    SSDPriorConfig,
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

# family exports (matching, sampling, detectors) are appended below by each family.
from .priors import ssd_keras_anchors  # ssd_keras family
from .coders import encode_corner_offsets  # ssd_keras family
from .matching.greedy import GreedyMatch, greedy_bipartite_match, match_greedy, match_greedy_boxes  # ssd_keras family
from .sampling.batch_hard_negative import mine_hard_negatives_batchwide  # ssd_keras family
from .matching.bipartite import PriorMatch, match_priors  # SSD family
from .sampling.hard_negative import mine_hard_negatives, top_k_mask  # SSD family
from .detectors.ssd import MultiBoxAssignment, SSDLoss  # SSD family
from .detectors.retinaface import RetinaFaceLoss  # SSD family
from .matching.max_iou import MaxIoUAssignment, max_iou_match  # Faster R-CNN / RetinaNet family
from .sampling.balanced import sample_balanced  # Faster R-CNN / RetinaNet family
from .detectors.faster_rcnn import (  # Faster R-CNN / RetinaNet family
    FasterRCNNLoss, ProposalTargets, RCNNLoss, RPNLoss, RPNTargets, proposal_targets, rpn_targets,
)
from .detectors.retinanet import RetinaNetAssignment, RetinaNetLoss  # Faster R-CNN / RetinaNet family
from .matching.yolo import assign_yolo_anchors, build_yolo_targets  # YOLOv3 family
from .detectors.yolov3 import YOLOv3Loss  # YOLOv3 family
