"""detloss.compat"""
from . import ssd_keras  # noqa: F401  (detloss.compat.ssd_keras.SSDLoss / SSDInputEncoder)
