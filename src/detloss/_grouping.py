"""Grouping of rows by a per-row count, for CPU paths that size work by the largest count.

Padded batches size per-row work by the largest row: the matcher computes IoU for as many GT
slots as the fullest image has, the hard-negative ``topk`` ranks as deep as the image with the
most positives asks. Where reading the counts is free (the CPU, eager mode) rows of similar
count can be processed together instead, each group only as wide as its own largest count.
"""
from __future__ import annotations

from itertools import accumulate


def group_by_count(counts: list[int], group_cost: float) -> list[tuple[list[int], int]]:
    """Rows grouped by ``counts``, as ``(row indices, largest count in the group)``.

    Groups are runs of the distinct counts in decreasing order, chosen to minimise
    ``sum(rows in group * largest count) + group_cost * groups``: the work computed plus a
    fixed cost per group, in the same unit (a dynamic programme over the distinct counts).
    Rows of count 0 are left out; every other row is in exactly one group.
    """
    by_count: dict[int, list[int]] = {}
    for row, count in enumerate(counts):
        if count > 0:
            by_count.setdefault(count, []).append(row)
    widths = sorted(by_count, reverse=True)
    rows_before = list(accumulate((len(by_count[w]) for w in widths), initial=0))  # rows of widths[:j]
    # best[j]: least cost of grouping widths[:j]; cut[j]: where its last group starts
    best, cut = [0.0] + [None] * len(widths), [0] * (len(widths) + 1)
    for j in range(1, len(widths) + 1):
        for i in range(j):
            cost = best[i] + (rows_before[j] - rows_before[i]) * widths[i] + group_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(widths)
    while j > 0:
        i = cut[j]
        groups.append(([row for w in widths[i:j] for row in by_count[w]], widths[i]))
        j = i
    return groups
