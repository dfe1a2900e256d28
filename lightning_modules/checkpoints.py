"""Detector checkpoints (and other torch files) read safely.

A checkpoint is a pickle: loaded the default way it can run any code its author chose. Every checkpoint
(and any other torch file) is read with `weights_only=True`, which allows tensors and plain data only;
what `python -m cli fit` writes needs nothing else. The detector's class is recorded by its import path
(`DetectorBase.on_save_checkpoint`), so any `DetectorBase` subclass loads without a hand-kept list; the
path names code already installed on the user's Python path, never code carried by the file.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch

from lightning_modules.detectors import DetectorBase
from lightning_modules.maps import import_map_modules


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


def detector_class(class_path: str, source: str) -> type[DetectorBase]:
    """The DetectorBase subclass a checkpoint names (`module.Class`; a bare name is one of ours)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        owner = importlib.import_module(module_name or "lightning_modules.detectors")
        cls = getattr(owner, name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{source}: its detector class {class_path} cannot be imported ({error}); install or put "
                         "on PYTHONPATH the module that defines it") from None
    if not (isinstance(cls, type) and issubclass(cls, DetectorBase)):
        raise ValueError(f"{source}: {class_path} is not a DetectorBase subclass")
    return cls


def map_modules_of(feature_provenance: dict[str, Any]) -> list[str]:
    """The modules that register the maps a store's or checkpoint's features came from (format 2 records them)."""
    features = feature_provenance.get("features")
    parts = features.values() if isinstance(features, dict) else []
    return list(dict.fromkeys(part["module"] for part in parts if isinstance(part, dict) and "module" in part))


def load_detector(checkpoint_path: str | Path) -> tuple[DetectorBase, dict[str, Any]]:
    """The detector in a checkpoint (evaluation mode, CPU) and the feature provenance it was trained with."""
    source = f"checkpoint {checkpoint_path}"
    checkpoint = safe_torch_load(checkpoint_path, "checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{source}: a PyTorch file but not a Lightning checkpoint (no state_dict)")
    class_path, provenance = checkpoint.get("detector_class"), checkpoint.get("feature_provenance")
    if not class_path or not provenance:
        raise ValueError(f"{source} has no detector_class/feature_provenance: it was not written by "
                         "`python -m cli fit` of a detector on a feature store")
    cls = detector_class(class_path, source)
    import_map_modules(map_modules_of(provenance))  # the registry must know the guidance maps' channels
    detector = cls.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True)
    return detector.eval(), provenance
