"""detloss.matching"""
from .yolo import YoloAssignment, YoloTargets, assign_yolo_anchors, build_yolo_targets
from .bipartite import PriorMatch, match_priors
from .greedy import GreedyMatch, greedy_bipartite_match, match_greedy, match_greedy_boxes
from .max_iou import MaxIoUAssignment, max_iou_match
