"""How large one chunk of a chunked pass is: every chunk size of the library, in one table.

Memory that grows with the number of anchors, priors, predictions or objects is bounded by
working through it in chunks. How large a chunk should be depends on where it runs:

* on the CPU in eager mode, small enough for a chunk's temporaries to stay in cache (how each
  size was chosen: ``benchmarks/README.md``);
* on accelerators and under ``torch.compile`` (the loop unrolled into the graph, each chunk
  fused), large, so that a pass launches few kernels, while the memory stays bounded.

Each entry counts the elements of one chunk of the pass's largest temporary.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class ChunkSize(NamedTuple):
    """Elements per chunk of one pass: on the CPU in eager mode, and elsewhere."""

    cpu: int
    accelerator: int


#: (image, GT, prior) IoU entries of the SSD / RetinaFace matcher (bipartite forcing)
PRIOR_IOU = ChunkSize(1 << 17, 1 << 24)
#: (image, GT, anchor) IoU entries of the max-IoU matcher (RPN, RetinaNet, R-CNN proposals)
ANCHOR_IOU = ChunkSize(1 << 17, 1 << 21)
#: (image, true box, prediction) IoU entries of YOLOv3's ignore rule
YOLO_IGNORE_IOU = ChunkSize(1 << 17, 1 << 21)
#: (problem, query, GT) entries of the DETR matching cost
DETR_COST = ChunkSize(1 << 18, 1 << 22)
#: (image, GT, anchor) pairs of the task-aligned assigner
TASK_ALIGNED_PAIRS = ChunkSize(1 << 20, 1 << 22)
#: (row, class) entries of the cross-entropy backward
CROSS_ENTROPY_ROWS = ChunkSize(1 << 17, 1 << 21)
#: (row, class) entries of the no-grad log-sum-exp that ranks SSD negatives (CPU path only)
LOGSUMEXP_ROWS = ChunkSize(1 << 19, 1 << 19)
#: (anchor, class) logits of the fused sigmoid focal sum (RetinaNet)
FOCAL_LOGITS = ChunkSize(1 << 16, 1 << 21)


def chunk_elements(device: torch.device, size: ChunkSize) -> int:
    """Elements per chunk of a pass of ``size`` over tensors on ``device``."""
    return size.cpu if cache_sized(device) else size.accelerator


def cache_sized(device: torch.device) -> bool:
    """Whether chunks on ``device`` should be cache-sized: the CPU, outside ``torch.compile``."""
    return device.type == "cpu" and not torch.compiler.is_compiling()
