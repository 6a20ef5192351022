"""Waiting for LiteLLM's batched spend write: reads spaced in proportion to the time waited (a quarter of it,
from 50 ms up to poll_s), so a write is seen at most a quarter of the wait late at a bounded number of reads."""

from __future__ import annotations

import pytest

from coder_stack.litellm.admin import FIRST_POLL_S, poll_interval


@pytest.mark.parametrize(
    ("waited", "poll_s", "expected"),
    [(0.0, 0.5, FIRST_POLL_S), (0.1, 0.5, FIRST_POLL_S), (0.8, 0.5, 0.2), (1.6, 0.5, 0.4), (9.0, 0.5, 0.5)],
)
def test_the_interval_is_a_quarter_of_the_wait_between_the_first_poll_and_poll_s(
    waited: float, poll_s: float, expected: float
) -> None:
    assert poll_interval(waited, poll_s) == pytest.approx(expected)


def _read_times(write_at: float, poll_s: float = 0.5) -> list[float]:
    """The times a reader following the rule reads, until it sees a write landing at ``write_at``."""
    t, reads = 0.0, [0.0]
    while t < write_at:
        t += poll_interval(t, poll_s)
        reads.append(t)
    return reads


@pytest.mark.parametrize("write_at", [0.8, 2.0, 10.0, 13.0])
def test_a_write_is_seen_at_most_a_quarter_of_the_wait_or_one_interval_late_with_few_reads(write_at: float) -> None:
    reads = _read_times(write_at)
    late = reads[-1] - write_at
    assert late <= max(write_at / 4, FIRST_POLL_S) + 1e-9, (write_at, reads[-3:])
    # a fixed 0.5 s interval reads write_at / 0.5 + 1 times; the rule costs at most ~15 reads more
    assert len(reads) <= write_at / 0.5 + 16, len(reads)
