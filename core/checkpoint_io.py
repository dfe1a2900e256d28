"""Torch files (checkpoints, posteriors, members files) read safely: the one place `torch.load` is called.

A checkpoint is a pickle: loaded the default way it can run any code its author chose. Every torch file is
read with `weights_only=True`, which allows tensors and plain data only; what `python -m cli fit` writes
needs nothing else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def _one_line(error: BaseException) -> str:
    """The informative line of a torch/pickle error (torch's weights-only refusal is a paragraph)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((text for text in lines if "GLOBAL" in text), lines[0] if lines else "")
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def safe_torch_load(path: str | Path, what: str) -> Any:
    """`torch.load(weights_only=True)` of a file; missing, refused and unreadable files are one line naming it.

    `what` names the kind of file in messages ("checkpoint", "posterior").
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file}: no such file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # a class or function to import and call: what code execution needs
            raise ValueError(f"{what} {file}: refused, it holds objects other than tensors and plain data, which "
                             f"could run code when loaded ({_one_line(error)})") from None
        raise ValueError(f"{what} {file}: not a readable PyTorch file ({_one_line(error)})") from None
    except Exception as error:  # noqa: BLE001  torch raises EOFError, RuntimeError, KeyError... for damaged files
        raise ValueError(f"{what} {file}: not a readable PyTorch file, truncated or damaged "
                         f"({_one_line(error)})") from None
