"""Drop-ins with the originals' constructor and call signatures, thin layers over the native code.

Import the module of the original you are replacing, e.g.
``from detloss.compat.ssd_pytorch import MultiBoxLoss``:
``detr``, ``ssd_pytorch``, ``retinaface``, ``ssd_keras``, ``tensorflow_yolov3``, ``tf_faster_rcnn``, ``ultralytics``.
"""
from . import detr, retinaface, ssd_keras, ssd_pytorch, tensorflow_yolov3, tf_faster_rcnn, ultralytics

__all__ = ["detr", "retinaface", "ssd_keras", "ssd_pytorch", "tensorflow_yolov3", "tf_faster_rcnn", "ultralytics"]
