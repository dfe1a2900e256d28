"""Work split across the machine's cores by threads: for copies and checksums that release the GIL.

One core's copies stop well short of the memory bus: on the 2-core VM one thread gathers 35k batch rows/s, two
74k; one thread reads the page cache into row buffers and checks their crc32c at 3.2-4.1 GB/s, two at 6.5-7.6
(below a plain one-thread read's 4.1-5.1). So the resident gather (`gather_rows`) and a window's reads
(`SplitRows.read`) give half of their work to one helper thread and do the other half themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

LANES = 2 if len(os.sched_getaffinity(0)) > 1 else 1  # the caller plus one helper thread; one lane on one core
_HELPER = ThreadPoolExecutor(1, thread_name_prefix="second-lane") if LANES > 1 else None


def in_two_lanes(count: int, work: Callable[[int, int, int], None]) -> None:
    """`work(lane, start, stop)` for the two halves of range(count): lane 1 (the first half) on the helper thread,
    lane 0 (the rest) on the caller, both finished (and the helper's error raised) on return. One lane (0, 0,
    count) on a one-core machine or when there is only one item. `work` must not call `in_two_lanes` itself (the
    helper is one thread, shared by all callers: concurrent callers take turns on it)."""
    half = count // 2 if _HELPER is not None else 0
    if half == 0:
        work(0, 0, count)
        return
    helper = _HELPER.submit(work, 1, 0, half)
    try:
        work(0, half, count)
    finally:
        helper.result()
