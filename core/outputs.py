"""Output locations checked before any work: a folder or file a command will write, created and proven writable.

A command that computes for minutes and then finds its output under a file, on a read-only filesystem or in a
folder it may not write loses that work, with a traceback. These checks run first and refuse in one line naming
the option, the path and the system's reason; `write_failure` words an OSError met later (a full disk) the same way.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

# Errors about the place output goes (full, read-only, not ours), never about the program: `python -m cli` reports
# them as one line wherever they are raised (a full disk meets a writer thread deep inside zarr).
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG})


def write_failure(what: str, path: str | Path, error: OSError) -> ValueError:
    """One line for an OSError met writing `path`: `what PATH: cannot write there (No space left on device)`."""
    if error.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir met a file where a folder had to be
        reason = "a folder on its path is a file"
    else:
        reason = error.strerror or type(error).__name__
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
    return ValueError(f"{what} {path}: cannot write there: {reason}{where}")


def _make_writable(folder: Path) -> None:
    """Create `folder` (and parents) and write then delete a probe file in it: raises what the system says."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
        pass


def output_dir(path: str | Path, what: str) -> Path:
    """Folder `path` created (with its parents) and proven writable; one-line ValueError naming `what` otherwise."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder}: is a file, not a folder")
    try:
        _make_writable(folder)
    except OSError as error:
        raise write_failure(what, folder, error) from None
    return folder


def output_file(path: str | Path, what: str) -> Path:
    """A file `path` that can be written: not a folder, its folder created and proven writable."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"{what} {file}: is a folder; give a file path")
    try:
        _make_writable(file.parent)
    except OSError as error:
        raise write_failure(what, file, error) from None
    return file
