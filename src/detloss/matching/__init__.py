"""Who is positive: one module per matcher (see each module's docstring for its rules)."""
from .bipartite import PriorMatch, match_priors
from .hungarian import HungarianMatch, detr_matching_cost, match_hungarian
from .greedy import GreedyMatch, greedy_bipartite_match, match_greedy, match_greedy_boxes
from .max_iou import MaxIoUAssignment, max_iou_match
from .rcnn_targets import ProposalTargets, RPNTargets, proposal_targets, rpn_targets
from .task_aligned import TaskAlignedAssignment, match_rotated_task_aligned, match_task_aligned
from .yolo import YoloAssignment, YoloTargets, assign_yolo_anchors, build_yolo_targets
