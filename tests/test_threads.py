"""core.threads.in_two_lanes: half of a copy-bound job on a helper thread, half on the caller."""

from __future__ import annotations

import threading

import pytest

from core.threads import LANES, in_two_lanes


@pytest.mark.parametrize("count", [0, 1, 2, 7])
def test_two_lanes_cover_every_item_once_on_two_threads(count: int) -> None:
    """Catches halves that overlap or leave an item out (odd counts), lane numbers swapped between the threads
    (each lane owns readers that are not thread-safe), and a split that quietly runs everything on the caller."""
    calls: list[tuple[int, int, int, int]] = []
    in_two_lanes(count, lambda lane, start, stop: calls.append((lane, start, stop, threading.get_ident())))
    covered = sorted(item for _, start, stop, _ in calls for item in range(start, stop))
    assert covered == list(range(count))
    caller = threading.get_ident()
    if LANES == 1 or count < 2:
        assert [(lane, thread) for lane, _, _, thread in calls] == [(0, caller)]
    else:
        assert sorted((lane, thread == caller) for lane, _, _, thread in calls) == [(0, True), (1, False)]


def test_the_helpers_error_is_raised_after_both_lanes_finished() -> None:
    """Catches an error on the helper thread being lost (rows handed out unchecked) and a return before the
    caller's half is done."""
    if LANES == 1:
        pytest.skip("one core: one lane, nothing runs on a helper")
    done: list[int] = []

    def work(lane: int, start: int, stop: int) -> None:
        if lane == 1:
            raise ValueError("damaged chunk in the helper's half")
        done.append(stop - start)

    with pytest.raises(ValueError, match="damaged chunk in the helper's half"):
        in_two_lanes(9, work)
    assert done == [5]
