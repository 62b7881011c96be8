"""Two-process gloo test: DDP gradients equal the single-process gradients, every family
(the real-time DETR and the oriented-box / YOLO26 families included).

One ``torch.multiprocessing.spawn`` of 2 ranks runs every family and scenario. Each rank
takes its half of a global batch of 4 images and computes the gradient of its loss with
respect to its half of the predictions. DDP averages parameter gradients over ranks, so the
gradient that reaches the network through image ``i`` (on rank ``r``) is ``grad_r[i] / 2``;
the promise is that this equals the single-process gradient on the global batch.

* Positive-count normalisers (SSD, RetinaFace, RetinaNet, YOLOv3 ``normalize_by="num_pos"``)
  and the R-CNN sample-count normalisers (RPN, R-CNN, Faster R-CNN) hold it with
  ``distributed=True`` for any split, including a step where one rank's half has no GT at
  all (``one-empty``).
* YOLOv3's default ``normalize_by="batch"`` (sum over cells, mean over images) needs no
  communication: it holds because both ranks have the same number of images.
* Without ``distributed`` a positive-count loss differs as soon as the ranks' counts differ
  (checked for SSD, so the comparison can fail).
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .cases import FAMILIES, RT_DETR_FAMILIES, YOLO_TASK_FAMILIES, loss_and_grads, make_case

WORLD = 2
SCENARIOS = {"both": [3, 1, 2, 4], "one-empty": [2, 3, 0, 0]}
# (family, options, label); every entry is run in every scenario
CONFIGS = [(f, {"distributed": True}, f) for f in FAMILIES + RT_DETR_FAMILIES + YOLO_TASK_FAMILIES if f != "yolov3"] + [
    ("yolov3", {"distributed": True, "normalize_by": "num_pos"}, "yolov3-num_pos"),
    ("yolov3", {}, "yolov3-batch"),
    ("ssd", {}, "ssd-not-distributed"),
]


def _case(family: str, options: dict, counts: list):
    return make_case(family, batch=4, num_gt=counts, seed=61, sample_all=True, options=options)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        half = 4 // WORLD
        for family, options, label in CONFIGS:
            for scenario, counts in SCENARIOS.items():
                case = _case(family, options, counts).slice(rank * half, (rank + 1) * half).leaves()
                _, grads = loss_and_grads(case)
                torch.save([g.detach() for g in grads], os.path.join(out_dir, f"{label}-{scenario}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_grads():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        yield {
            name[:-3]: torch.load(os.path.join(out_dir, name)) for name in os.listdir(out_dir)
        }


def _ddp_equals_single(rank_grads, family, options, label, scenario) -> bool:
    single = _case(family, {k: v for k, v in options.items() if k != "distributed"}, SCENARIOS[scenario])
    _, grads = loss_and_grads(single.leaves())
    half = 4 // WORLD
    equal = True
    for rank in range(WORLD):
        for g_rank, g_all, dim in zip(rank_grads[f"{label}-{scenario}-{rank}"], grads, single.pred_batch_dims()):
            ddp = g_rank / WORLD  # DDP averages: this rank's contribution, the other adds 0 here
            equal &= torch.allclose(ddp, g_all.narrow(dim, rank * half, half), rtol=1e-5, atol=1e-7)
    return bool(equal)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family,options,label", [c for c in CONFIGS if c[2] != "ssd-not-distributed"],
                         ids=[c[2] for c in CONFIGS if c[2] != "ssd-not-distributed"])
def test_ddp_gradients_equal_single_process(rank_grads, family, options, label, scenario):
    assert _ddp_equals_single(rank_grads, family, options, label, scenario)


def test_without_distributed_the_split_changes_gradients(rank_grads):
    assert not _ddp_equals_single(rank_grads, "ssd", {}, "ssd-not-distributed", "one-empty")
