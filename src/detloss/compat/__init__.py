"""detloss.compat"""
from . import ssd_keras  # noqa: F401  (detloss.compat.ssd_keras.SSDLoss / SSDInputEncoder)
from . import tf_faster_rcnn  # noqa: F401  (detloss.compat.tf_faster_rcnn.anchor_target_layer / add_losses ...)
