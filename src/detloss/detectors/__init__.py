"""Composite losses, one module per detector family (assignment, terms, normalisation)."""
from .detr import DETRAssignment, DETRLoss
from .rt_detr import RTDETRAssignment, RTDETRLoss
from .faster_rcnn import FasterRCNNLoss, RCNNLoss, RPNLoss
from .retinaface import RetinaFaceLoss
from .retinanet import RetinaNetAssignment, RetinaNetLoss
from .ssd import MultiBoxAssignment, SSDLoss
from .yolov3 import YOLOv3Loss, YOLOv3LossAssignment
from .yolov8 import YOLOv8Loss
from .yolo_obb import YOLOOBBLoss
from .yolo26 import YOLO26Loss, yolo26_branch_weights
