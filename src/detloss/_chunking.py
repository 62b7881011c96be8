"""How large one chunk of a chunked pass is: one rule for where the pass runs.

Memory that grows with the number of anchors, priors, predictions or objects is bounded by
working through it in chunks. How large a chunk should be depends on where it runs:

* on the CPU in eager mode, small enough for a chunk's temporaries to stay in cache: each
  pass passes its own tuned ``cpu`` size (how each was chosen: ``benchmarks/README.md``);
* on accelerators and under ``torch.compile`` (the loop unrolled into the graph, each chunk
  fused), large, so that a pass launches few kernels: ``accelerator`` elements, which still
  bounds the memory.
"""
from __future__ import annotations

import torch

ACCELERATOR_CHUNK_ELEMENTS = 1 << 21


def chunk_elements(device: torch.device, cpu: int, accelerator: int = ACCELERATOR_CHUNK_ELEMENTS) -> int:
    """Elements per chunk for a pass over tensors on ``device``: ``cpu`` on the CPU in eager
    mode, else ``accelerator``."""
    return cpu if cache_sized(device) else accelerator


def cache_sized(device: torch.device) -> bool:
    """Whether chunks on ``device`` should be cache-sized: the CPU, outside ``torch.compile``."""
    return device.type == "cpu" and not torch.compiler.is_compiling()
