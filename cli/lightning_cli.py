"""LightningCLI for the Trainer runs over configs: fit, validate, test, precompute, laplace-fit.

`predict` (raw images with a trained detector) is a plain command: it builds its Trainer from a checkpoint.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

import datamodules  # noqa: F401  (registers classes so YAML can name them bare)
import lightning_modules  # noqa: F401
from cli.trainer import ForensicsTrainer

# Subcommand names as typed; LightningCLI needs the Trainer method's name.
TRAINER_SUBCOMMANDS = {"fit": "fit", "validate": "validate", "test": "test",
                       "precompute": "precompute", "laplace-fit": "laplace_fit"}


class SaveConfigBesideOutput(SaveConfigCallback):
    """precompute hands the resolved config to the store's writer (saved as STORE/configs/precompute-*.yaml),
    so a run never writes config.yaml into the working directory, where a user's own file may be."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from feature_cache.writer import ZarrFeatureWriter

        writers = [c for c in trainer.callbacks if isinstance(c, ZarrFeatureWriter)]
        if writers:
            writers[0].config_text = self.parser.dump(self.config, skip_none=False)
            return
        super().setup(trainer, pl_module, stage)


class ForensicsCLI(LightningCLI):
    """LightningCLI with the project's Trainer subcommands added to Lightning's four."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(),
                "precompute": {"model", "datamodule"},
                "laplace_fit": {"model", "datamodule"}}


def run_lightning_cli(argv: list[str]) -> None:
    """Run one Trainer subcommand; every run saves its resolved config next to its logs."""
    argv = [TRAINER_SUBCOMMANDS.get(argv[0], argv[0]), *argv[1:]] if argv else argv
    # We pass argv explicitly because `laplace-fit` is renamed to its Trainer method; that is intended.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    ForensicsCLI(
        trainer_class=ForensicsTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigBesideOutput,
        save_config_kwargs={"overwrite": True},
        args=argv,
        parser_kwargs={"prog": "python -m cli"},
    )
