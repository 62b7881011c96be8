"""Which negatives enter the loss: hard negative mining and balanced random sampling."""
from .balanced import sample_balanced, sample_rois
from .batch_hard_negative import mine_hard_negatives_batchwide
from .hard_negative import mine_hard_negatives, top_k_mask
