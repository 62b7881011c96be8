"""detloss.detectors"""
from .ssd import MultiBoxAssignment, SSDLoss
from .retinaface import RetinaFaceLoss
