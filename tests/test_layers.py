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
    result = subprocess.run([command, str(REPO / "pyproject.toml")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout, result.stdout[-4000:]


def test_the_lightning_loop_attribute_we_set_still_works() -> None:
    """`generate` and `ensemble-fit` predict with gradients by setting `trainer.predict_loop.inference_mode` (a
    public name on Lightning's internal `_PredictionLoop`; pyproject pins `lightning` below 2.7 for it). Catches a
    Lightning release where the attribute is gone or no longer decides the predict context: the members would
    then train under inference mode and fail (or silently not train)."""
    import lightning.pytorch as pl
    import torch

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[bool] = []

        def predict_step(self, batch: torch.Tensor) -> None:
            self.seen.append(torch.is_inference_mode_enabled())

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_model_summary=False)
    probe = Probe()
    for setting in (True, False):
        trainer.predict_loop.inference_mode = setting
        trainer.predict(probe, dataloaders=torch.utils.data.DataLoader(torch.zeros(1, 1)), return_predictions=False)
    assert probe.seen == [True, False]
