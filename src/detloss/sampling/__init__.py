"""detloss.sampling"""
from .batch_hard_negative import mine_hard_negatives_batchwide
from .hard_negative import mine_hard_negatives, top_k_mask
from .balanced import sample_balanced
