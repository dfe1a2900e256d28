"""Shared fixtures: offline hub, tiny models built once per session through the real loaders."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lightning_modules.tiny_models import build_tiny_models  # noqa: E402
from timeouts import pytest_collection_modifyitems  # noqa: E402,F401  (the hook: slow tests' longer limit)

pytest_plugins = ["shared_speedwf", "schedule"]  # a demo run shared across files; the longest files first


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of tiny SD (`sd`) and CLIP (`clip`) models on disk, in the real layouts."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
