"""Paired A/B of each CPU-only ("gathered") path: what removing it alone costs its family's step.

For every module that still holds a gathered path (it imports ``host_sync_is_free``) and every
family step that runs through it, the step is timed with all paths in place (A) and with that
module's paths replaced by their dense forms (B: the module's ``host_sync_is_free`` answers
False), alternating A and B for ``--rounds`` rounds of ``--runs`` steps each in one process,
so the machine's load drifts over both alike. A path earns its place by a median paired
slowdown of at least 10 % of the step (the bar of issue #16, listed in ``detloss.strategy``).
The last row of each family is the whole dense strategy against ``auto``.

    python benchmarks/ab_gathered_paths.py [--rounds 12] [--runs 5] [--threads 2] [--families ssd retinaface yolov3-8 yolov3-32 retinanet]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch

import detloss
import bench_ssd
import bench_two_stage
import bench_yolov3

# modules whose gathered paths can be switched off one at a time
CANDIDATE_MODULES = (
    "detloss.functional.selection",
    "detloss.functional.multibox",
    "detloss.matching.bipartite",
    "detloss.sampling.hard_negative",
    "detloss.detectors.yolov3",
    "detloss.boxes",
    "detloss._memory",
    "detloss.matching.task_aligned",
)


def gathered_modules() -> list[str]:
    """The candidate modules that still read ``host_sync_is_free`` (deleted paths drop out)."""
    return [m for m in CANDIDATE_MODULES if hasattr(importlib.import_module(m), "host_sync_is_free")]


@contextmanager
def dense_in(module_name: str) -> Iterator[None]:
    module = importlib.import_module(module_name)
    original = module.host_sync_is_free
    module.host_sync_is_free = lambda _x: False
    try:
        yield
    finally:
        module.host_sync_is_free = original


def family_steps(names: list[str]) -> dict[str, Callable[[], None]]:
    steps = {}
    for name in names:
        if name in ("ssd", "retinaface"):
            x = bench_ssd.make_inputs(name)
            loss = bench_ssd.native_loss(x)
            steps[name] = (lambda x=x, loss=loss: bench_ssd.native_step(x, loss))
        elif name.startswith("yolov3"):
            batch = int(name.split("-")[1])
            heads, boxes, labels, valid = bench_yolov3.make_inputs(batch, "cpu")
            loss = detloss.YOLOv3Loss(bench_yolov3.NUM_CLASSES)
            steps[name] = (lambda h=heads, b=boxes, lab=labels, v=valid, loss=loss:
                           bench_yolov3.run_native(h, b, lab, v, loss))
        else:
            steps[name] = bench_two_stage.build(name)[0]
    return steps


def timed(step: Callable[[], None], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired(step: Callable[[], None], variant: Callable[[], ExitStack], rounds: int, runs: int) -> tuple[float, float, float]:
    """Median A ms, median B ms and the median of the per-round slowdowns B / A - 1."""
    a_ms, b_ms, ratios = [], [], []
    step()
    with variant():
        step()  # warm both forms
    for _ in range(rounds):
        a = timed(step, runs)
        with variant():
            b = timed(step, runs)
        a_ms.append(a)
        b_ms.append(b)
        ratios.append(b / a - 1)
    return statistics.median(a_ms), statistics.median(b_ms), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=["ssd", "retinaface", "yolov3-8", "yolov3-32", "retinanet"])
    parser.add_argument("--modules", nargs="+", help="only these modules (last name part, e.g. bipartite)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detloss.set_value_checks(True)
    steps = family_steps(args.families)
    modules = [m for m in gathered_modules() if not args.modules or m.split(".")[-1] in args.modules]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x {args.runs} runs; "
          f"modules with gathered paths: {', '.join(m.split('.')[-1] for m in modules)}")
    print(f"{'family':<11} {'path removed':<16} {'with ms':>8} {'without ms':>10} {'slowdown':>9}  verdict")
    for family, step in steps.items():
        for module in modules:
            a, b, slow = paired(step, lambda m=module: dense_in(m), args.rounds, args.runs)
            if abs(b - a) < 1e-3 * a and abs(slow) < 1e-3:
                continue
            verdict = "keeps (>= 10 %)" if slow >= 0.10 else "below the bar"
            print(f"{family:<11} {module.split('.')[-1]:<16} {a:8.2f} {b:10.2f} {slow:+9.1%}  {verdict}", flush=True)
        a, b, slow = paired(step, lambda: detloss.execution_strategy("dense"), args.rounds, args.runs)
        print(f"{family:<11} {'ALL (dense)':<16} {a:8.2f} {b:10.2f} {slow:+9.1%}", flush=True)


if __name__ == "__main__":
    main()
