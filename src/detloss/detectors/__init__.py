"""detloss.detectors"""
from .ssd import MultiBoxAssignment, SSDLoss
from .retinaface import RetinaFaceLoss
from .faster_rcnn import FasterRCNNLoss, ProposalTargets, RCNNLoss, RPNLoss, RPNTargets, proposal_targets, rpn_targets
from .retinanet import RetinaNetAssignment, RetinaNetLoss
from .yolov3 import YOLOv3Loss, YOLOv3LossAssignment
