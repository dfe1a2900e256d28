"""The layer contracts of docs/contracts.md hold: import-linter over every package, as the test command runs it.

Bug caught: a lower package importing a higher one (feature_cache importing cli.progress, lightning_modules
importing datamodules), which makes the layers in docs/contracts.md a wish instead of a fact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept() -> None:
    command = shutil.which("lint-imports")
    assert command is not None, "lint-imports missing: install the dev extra (pip install -e '.[dev]')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([command, "--config", str(REPO / "pyproject.toml")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout, result.stdout[-4000:]
