"""Data-parallel demo training: 2 gloo processes give the single-process gradients.

Two processes (``torch.multiprocessing.spawn``, gloo on 127.0.0.1 with a free port) each take
half of a fixed global batch, run the demo's model and loss with ``distributed=True`` under
DistributedDataParallel, and record the averaged gradients of a few SGD steps. One process on
the whole global batch (``distributed=False``, no DDP) must give the same gradients to float32
precision. A control run without the distributed normaliser must differ, which shows that the
comparison can fail.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detloss.cli.data import collate, make_synthetic
from detloss.cli.heads import available_families
from detloss.cli.train import build_model, compute_loss, global_batches, shard

IMAGE_SIZE, GLOBAL_BATCH, STEPS, WIDTH = 64, 8, 3, 16
FAMILIES = [f for f in ("ssd", "retinanet", "yolov3", "retinaface") if f in available_families()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradients(family: str, rank: int, world: int, distributed_loss: bool) -> list[torch.Tensor]:
    """Per step, the flat gradient after backward (DDP-averaged when world > 1)."""
    torch.manual_seed(0)
    data = make_synthetic(2 * GLOBAL_BATCH, IMAGE_SIZE, seed=3, faces=family == "retinaface")
    model = build_model(family, data.num_classes, IMAGE_SIZE, distributed=distributed_loss, width=WIDTH)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(STEPS):
        indices = global_batches(len(data), GLOBAL_BATCH, seed=1, epoch=0)[step % 2]
        batch = collate(data, shard(indices, rank, world))
        opt.zero_grad()
        compute_loss(ddp, model.head, batch)["loss"].backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).clone())
        opt.step()
    return grads


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = {(f, True): _gradients(f, rank, world, True) for f in FAMILIES}
        runs[("ssd", False)] = _gradients("ssd", rank, world, False)
        if rank == 0:
            torch.save(runs, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_gradients(tmp_path_factory) -> dict:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if "ssd" not in FAMILIES:
        pytest.skip("detloss.SSDLoss is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out / "grads.pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_gloo_processes_equal_single_process_gradients(two_process_gradients, family):
    torch.set_num_threads(1)
    single = _gradients(family, 0, 1, False)
    for step, (a, b) in enumerate(zip(two_process_gradients[(family, True)], single)):
        scale = b.abs().max().clamp(min=1e-6)
        err = (a - b).abs().max() / scale
        assert err < 2e-4, f"{family} step {step}: max relative gradient error {float(err):.2e}"


def test_without_distributed_normaliser_gradients_differ(two_process_gradients):
    """Control: local positive counts as normaliser do not reproduce the global gradient."""
    torch.set_num_threads(1)
    single = _gradients("ssd", 0, 1, False)
    a, b = two_process_gradients[("ssd", False)][0], single[0]
    assert (a - b).abs().max() / b.abs().max() > 1e-3
