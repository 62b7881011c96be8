"""One chunk-size rule (``detloss._chunking``): cache-sized chunks on the CPU in eager mode, large
ones on accelerators and under torch.compile, and the same losses either way."""
from __future__ import annotations

import pytest
import torch

import detloss
from detloss import _chunking
from detloss.functional.classification import cross_entropy


def test_cpu_eager_takes_the_cache_size_accelerators_the_large_one():
    size = _chunking.ChunkSize(1 << 17, 1 << 24)
    assert _chunking.chunk_elements(torch.device("cpu"), size) == 1 << 17
    assert _chunking.chunk_elements(torch.device("meta"), size) == 1 << 24
    assert _chunking.chunk_elements(torch.device("cuda"), size) == 1 << 24


def test_compiled_code_takes_the_large_size_on_the_cpu():
    size = _chunking.ChunkSize(3, 5)
    traced = torch.compile(lambda x: x + _chunking.chunk_elements(x.device, size), backend="eager", fullgraph=True)
    assert traced(torch.zeros(1)).item() == 5
    assert _chunking.chunk_elements(torch.device("cpu"), size) == 3


def test_every_chunk_size_lives_in_the_table():
    """The library's chunked passes take their sizes from ``_chunking`` (one table): no module of
    the library defines a chunk-size constant of its own."""
    import re
    from pathlib import Path

    root = Path(detloss.__file__).parent
    own = [
        f"{path.relative_to(root)}: {line.strip()}"
        for path in root.rglob("*.py") if path.name != "_chunking.py"
        for line in path.read_text().splitlines()
        if re.match(r"\s*_*[A-Z_]*CHUNK[A-Z_]*\s*=", line)
    ]
    assert not own, own
    sizes = [v for v in vars(_chunking).values() if isinstance(v, _chunking.ChunkSize)]
    assert len(sizes) >= 8 and all(s.cpu > 0 and s.accelerator >= s.cpu for s in sizes)


@pytest.fixture
def accelerator_chunks(monkeypatch):
    """Chunked passes on the CPU take the sizes they take on accelerators."""
    monkeypatch.setattr(_chunking, "cache_sized", lambda _device: False)


def _retinanet():
    g = torch.Generator().manual_seed(0)
    anchors = detloss.retinanet_anchors(320)
    xy = torch.rand(2, 6, 2, generator=g) * 200
    gt = torch.cat((xy, xy + 20 + torch.rand(2, 6, 2, generator=g) * 90), -1)
    logits = torch.randn(2, anchors.shape[0], 80, generator=g, dtype=torch.float64, requires_grad=True)
    deltas = (0.1 * torch.randn(2, anchors.shape[0], 4, generator=g, dtype=torch.float64)).requires_grad_()
    out = detloss.RetinaNetLoss(80)(deltas, logits, anchors.double(), gt.double(), torch.randint(0, 80, (2, 6), generator=g),
                                    torch.ones(2, 6, dtype=torch.bool))
    return (out["loss"], *torch.autograd.grad(out["loss"], (logits, deltas)))


def _yolov3():
    g = torch.Generator().manual_seed(1)
    heads = [torch.randn(4, 416 // s, 416 // s, 3 * 85, generator=g, dtype=torch.float64, requires_grad=True) for s in (8, 16, 32)]
    xy = torch.rand(4, 8, 2, generator=g) * 300
    boxes = torch.cat((xy, xy + 8 + torch.rand(4, 8, 2, generator=g) * 60), -1)
    out = detloss.YOLOv3Loss(80)(heads, boxes.double(), torch.randint(0, 80, (4, 8), generator=g), torch.ones(4, 8, dtype=torch.bool))
    return (out["loss"], *torch.autograd.grad(out["loss"], heads))


def _cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(20000, 21, generator=g, dtype=torch.float64, requires_grad=True)
    loss = cross_entropy(logits, torch.randint(0, 21, (20000,), generator=g), reduction="sum")
    return (loss, *torch.autograd.grad(loss, logits))


@pytest.mark.parametrize("run", [_retinanet, _yolov3, _cross_entropy], ids=["retinanet", "yolov3", "cross_entropy"])
def test_losses_do_not_depend_on_the_chunk_size(run, request):
    with detloss.execution_strategy("dense"):
        cache_sized = run()
        request.getfixturevalue("accelerator_chunks")
        large = run()
    for a, b in zip(cache_sized, large):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
