"""``detloss._grouping.group_by_count``: every row in one group, and the cheapest grouping."""
from __future__ import annotations

from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from detloss._grouping import group_by_count

SETTINGS = settings(max_examples=200, deadline=None)


@SETTINGS
@given(st.lists(st.integers(0, 12), min_size=1, max_size=12), st.integers(0, 40))
def test_group_by_count_covers_every_row_and_is_optimal(counts, group_cost):
    groups = group_by_count(counts, group_cost)
    covered = sorted(i for images, _ in groups for i in images)
    assert covered == [i for i, c in enumerate(counts) if c > 0]
    for images, width in groups:
        assert width == max(counts[i] for i in images)
    cost = sum(len(images) * width + group_cost for images, width in groups)
    # brute force over the cuts of the distinct counts in decreasing order
    widths = sorted({c for c in counts if c > 0}, reverse=True)
    best = 0 if not widths else None
    for k in range(len(widths)):
        for cuts in combinations(range(1, len(widths)), k):
            bounds = (0,) + cuts + (len(widths),)
            total = sum(
                sum(counts.count(w) for w in widths[a:b]) * widths[a] + group_cost
                for a, b in zip(bounds, bounds[1:])
            )
            best = total if best is None else min(best, total)
    assert cost == best
