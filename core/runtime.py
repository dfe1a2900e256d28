"""Process settings that must be in place before the interpreter starts: set once, by re-executing the command.

glibc copies a buffer with non-temporal (streaming) stores only above `x86_non_temporal_threshold`, by default
3/4 of the shared L3 (225 MB on a VM reporting 300 MB). Phase 2's batch gathers copy rows of hundreds of KB
into batches they hand on, so below that threshold every store first reads its cache line from DRAM:
`benchmarks/cache_read.py` measured RAM batches at 50-61 % of a large memcpy, 74-83 % with 256 KiB
(docs/phase2_reading.md). glibc reads its tunables only at process start, hence the re-execution (same pid,
same command line, ~50 ms); other C libraries and CPUs ignore the variable.
"""

from __future__ import annotations

import os
import sys

STREAMING_COPIES = "glibc.cpu.x86_non_temporal_threshold=0x40000"


def with_streaming_copies() -> None:
    """Re-execute this command once with STREAMING_COPIES in GLIBC_TUNABLES (kept with any tunables already set);
    call first thing in a program's entry point. No-op when it is set (the re-executed process, DDP ranks that
    inherit the environment) or when `CLI_NO_REEXEC=1`."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if STREAMING_COPIES.split("=")[0] in tunables or os.environ.get("CLI_NO_REEXEC") == "1":
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, STREAMING_COPIES]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
