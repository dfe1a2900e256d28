"""LightningCLI for the Trainer runs over configs: fit, validate, test, precompute, laplace-fit, generate,
ensemble-fit; `build_cli` is the one place a `ForensicsCLI` is built (`python -m cli` and `grid --together`).

`predict` (raw images with a trained detector) is a plain command: it builds its Trainer from a checkpoint.
Runs of `fit`/`test`/`validate` are placed by `workflows.run_dirs`: one directory per fit, the seed in its name,
and `test` scores the fitted run's checkpoint (never an untrained model).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import datamodules.cached_features  # noqa: F401  (imported, YAML can name the data modules bare)
import datamodules.image_shards  # noqa: F401
import lightning_modules  # noqa: F401
from cli.commands import TRAINER_SUBCOMMANDS
from core.checkpoint_io import safe_torch_load
from core.trainer_progress import PlainLogProgress
from cli.parse_errors import OneLineErrors
from workflows.run_dirs import latest_fitted_run, next_run_dir, run_base, run_checkpoint
from cli.trainer import ForensicsTrainer

DETECTOR_RUNS = ("fit", "validate", "test")  # subcommands whose parsers link the detector's CLIP sizes to the stores


class SaveConfigBesideOutput(SaveConfigCallback):
    """Each run's resolved config goes beside what the run writes, never into the working directory (where a
    user's own config.yaml may be): precompute's into its store (the writer saves STORE/configs/precompute-*.yaml),
    a run with a logger into its log dir, a run without one (laplace-fit, ensemble-fit, generate) beside its
    output file (`OUTPUT.config.yaml`) or into its output folder."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from feature_cache.writer import ZarrFeatureWriter

        writers = [c for c in trainer.callbacks if isinstance(c, ZarrFeatureWriter)]
        if writers:
            writers[0].config_text = self.parser.dump(self.config, skip_none=False)
        elif trainer.logger is not None:
            super().setup(trainer, pl_module, stage)
        elif trainer.is_global_zero and (target := self._beside_output(pl_module)) is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.parser.dump(self.config, skip_none=False))

    def _beside_output(self, pl_module: pl.LightningModule) -> Path | None:
        output = getattr(pl_module, "hparams", {}).get("output")
        if output:
            return Path(output).expanduser().with_name(f"{Path(output).name}.config.yaml")
        folder = self.config.get("out")
        return Path(folder) / self.config_filename if folder else None


def layer3_channels(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Channels of the stored CLIP layer3 map (None without it: a fine-tuned tower gives its own)."""
    return shapes["clip_layer3"][0] if "clip_layer3" in shapes else None


def layer3_grid(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Side of the stored CLIP layer3 grid."""
    return shapes["clip_layer3"][-1] if "clip_layer3" in shapes else None


def first_dim(shape: tuple[int, ...]) -> int:
    """Dimension of the stored CLIP attention-pooled vector."""
    return shape[0]


SCORED = ("test", "validate")  # subcommands that score a fitted run's checkpoint
TEST_EVENTS = "test_events.json"
# Inherited by the processes a DDP launch re-executes, so every rank logs to the directory rank 0 chose
# (rank 0 may already have created it, and the next free name would differ).
RUN_DIR_ENV, CKPT_ENV = "CLI_RUN_DIR", "CLI_RUN_CKPT"  # event files written by the run's last `test`, replaced by the next

# Messages every run would print that say nothing about the user's run.
QUIET = ("The '.*_dataloader' does not have many workers", "LeafSpec", "Starting from v1.9.0, `tensorboardX`",
         "The number of training batches .* is smaller than the logging interval", "LightningCLI's args parameter",
         "Checkpoint directory .* exists and is not empty")


class ForensicsParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser that knows whether it parses a detector run (`build_cli` says so per subcommand).

    Args:
        detector_run: link the detector's CLIP sizes to the stores (fit, validate, test and `grid --together`'s
            rows); precompute & co. should report a bad model before a bad data directory, which a link reverses.
    """

    def __init__(self, *args: Any, detector_run: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.detector_run = detector_run


class ForensicsCLI(LightningCLI):
    """LightningCLI with the project's Trainer subcommands and run-directory rules."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(),
                "precompute": {"model", "datamodule"},
                "laplace_fit": {"model", "datamodule"},
                "generate": {"model"},
                "ensemble_fit": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A detector's CLIP dimensions and guidance channels are the stores' shapes, applied once the datamodule
        # exists (a configured value is replaced; None, without stored CLIP maps, lets a fine-tuned tower give its
        # own). `clip_pooled_shape`
        # exists only when clip_pooled is requested, so detectors without pooled vectors never receive `pooled_dim`.
        # Only for detector runs (and `grid --together`'s parser without subcommands): a link makes the datamodule
        # be built first, and precompute & co. should report a bad model before a bad data directory.
        if getattr(parser, "detector_run", True):
            for target, compute in (("visual_channels", layer3_channels), ("grid_size", layer3_grid)):
                parser.link_arguments("data.stored_shapes", f"model.init_args.{target}", compute_fn=compute,
                                      apply_on="instantiate")
            parser.link_arguments("data.clip_pooled_shape", "model.init_args.pooled_dim", compute_fn=first_dim,
                                  apply_on="instantiate")
            # The guidance maps' channel counts are the stores' too, so fit/test import no user map module.
            parser.link_arguments("data.guidance_channels", "model.init_args.guidance_channels", apply_on="instantiate")
        parser.add_argument("--paper_row", type=str | None, default=None,
                            help="Name of the published configuration this config reproduces (see "
                                 "reports.evaluation.PUBLISHED); its paper number is shown beside this run only "
                                 "when settings and protocol match.")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Every detector run (fit, validate, test, `grid --together`'s rows: all build this class) gets the same
        reports: `reports.callbacks.detector_callbacks()` go first, beside the config's own callbacks."""
        from lightning_modules.detectors import DetectorBase
        from reports.callbacks import detector_callbacks

        trainer = super().instantiate_trainer(**kwargs)
        if isinstance(self.model, DetectorBase):
            listed = {type(callback) for callback in trainer.callbacks}
            trainer.callbacks[:0] = [c for c in detector_callbacks() if type(c) not in listed]
        return trainer

    def instantiate_classes(self) -> None:
        """Build the classes, then refuse a detector whose inputs the datamodule does not request (one line, before
        any store is read)."""
        super().instantiate_classes()
        required = getattr(self.model, "required_features", None)
        features = getattr(self.datamodule, "features", None)
        if callable(required) and features is not None:
            missing = [name for name in required() if name not in features]
            if missing:
                raise ValueError(f"{type(self.model).__name__} reads {missing}, which data.init_args.features "
                                 f"{list(features)} does not request: add them (guidance maps, and CLIP's maps for "
                                 "a frozen backbone)")

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in ("fit", *SCORED):
            self._place_run(subcommand, self.config[subcommand])
        elif "subcommand" not in self.config:  # built without running (`grid --together`): a row to fit
            self._place_run("fit", self.config)
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and Path(ckpt).is_file():  # read safely before LightningCLI reads its hparams: a refusal is one line
            safe_torch_load(ckpt, "checkpoint")

    def _place_run(self, subcommand: str, config: Namespace) -> None:
        """Point the TensorBoardLogger at this run's directory (and `test` at the fitted run's checkpoint)."""
        logger = config.trainer.get("logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None or "save_dir" not in init or not str(logger.class_path).endswith("TensorBoardLogger"):
            return
        seed = config.get("seed_everything")
        if isinstance(seed, bool):
            raise ValueError("seed_everything must be an integer: the seed is part of the run's directory name")
        parent = Path(init.save_dir) / str(init.get("name") or "")
        base = run_base(str(init.get("version") or "run"), seed)
        ckpt = config.get("ckpt_path")
        if int(os.environ.get("LOCAL_RANK", 0)) > 0 and os.environ.get(RUN_DIR_ENV):  # a DDP rank: rank 0 chose
            run = Path(os.environ[RUN_DIR_ENV])
            config.ckpt_path = os.environ.get(CKPT_ENV) or ckpt
        elif subcommand == "fit":
            run = next_run_dir(parent, base)
        elif ckpt in (None, "best", "last"):
            run = latest_fitted_run(parent, base)
            if run is None:
                raise ValueError(f"no fitted run of {base} under {parent} (no {base}*/checkpoints/last.ckpt): "
                                 f"run `python -m cli fit` with the same configs first, or pass --ckpt_path FILE")
            config.ckpt_path = str(run_checkpoint(run, ckpt or "best"))
        elif Path(ckpt).parent.name == "checkpoints":
            run = Path(ckpt).parent.parent  # score a checkpoint where it was trained
        else:
            run = next_run_dir(parent, base)
        init.save_dir, init.name, init.version = str(run.parent), "", run.name
        os.environ[RUN_DIR_ENV], os.environ[CKPT_ENV] = str(run), str(config.get("ckpt_path") or "")
        print(f"python -m cli {subcommand}: run directory {run}" +
              (f", checkpoint {config.get('ckpt_path')}" if subcommand in SCORED else ""), flush=True)

    def before_test(self) -> None:
        """Note the run's event files (a finished test replaces the previous test's), hand `paper_row` to the report."""
        from reports.protocol_report import ProtocolReport

        for callback in self.trainer.callbacks:
            if isinstance(callback, ProtocolReport):
                callback.paper_row = self.config["test"].get("paper_row")
        run = self._run_dir()
        self._events_before = {p.name for p in run.glob("events.out.tfevents.*")} if run is not None else set()

    def after_test(self) -> None:
        """Only now drop the previous test's event files: a test refused or killed halfway keeps them."""
        run = self._run_dir()
        if run is not None and self.trainer.is_global_zero:
            marker = run / TEST_EVENTS
            if marker.is_file():
                for name in json.loads(marker.read_text()):
                    (run / name).unlink(missing_ok=True)
            written = sorted({p.name for p in run.glob("events.out.tfevents.*")} - self._events_before)
            marker.write_text(json.dumps(written))

    def _run_dir(self) -> Path | None:
        log_dir = self.trainer.log_dir
        return Path(log_dir) if log_dir is not None else None


def build_cli(args: list[str], run: bool = True, prog: str = "python -m cli") -> ForensicsCLI:
    """The one way a `ForensicsCLI` is built: same callbacks (plain-log progress), links, run placement and saved
    config for `python -m cli SUBCOMMAND ARGS` (`run=True`, runs it) and for one row of `grid --together`
    (`run=False`: ARGS are a `fit` command line without the subcommand; model, datamodule and Trainer are built,
    seeded and placed, not run). `fit` saves its resolved config as config.yaml, others as <command>_config.yaml.
    """
    if run:
        args = [TRAINER_SUBCOMMANDS.get(args[0], args[0]), *args[1:]] if args else args
    for message in QUIET:
        warnings.filterwarnings("ignore", message=f".*{message}")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))  # advertising
    config_name = "config.yaml" if not run or args[:1] == ["fit"] else f"{args[0] if args else 'run'}_config.yaml"
    not_detector = {method: {"detector_run": False} for method in TRAINER_SUBCOMMANDS.values() if method not in DETECTOR_RUNS}
    return ForensicsCLI(
        trainer_class=ForensicsTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigBesideOutput,
        save_config_kwargs={"overwrite": True, "config_filename": config_name},
        trainer_defaults={"callbacks": [PlainLogProgress()]},  # added to the config's callbacks
        args=args,
        run=run,
        parser_class=ForensicsParser,  # OneLineErrors: a bad key's line first, no usage block, no abbreviations
        parser_kwargs={"prog": prog, **not_detector},
    )


def resolve_config(args: list[str]) -> dict[str, Any]:
    """The config a Trainer command line (`fit --config ...`) resolves to, as its `--print_config` prints it, parsed in
    this process: `grid` reads each row's logger and seed before any run starts, without an interpreter per row.
    A command line that does not parse raises ValueError with the parser's one-line error."""
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        try:
            build_cli([*args, "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise ValueError((errors.getvalue().strip().splitlines() or [str(exit_.code)])[0]) from None
    return yaml.safe_load(printed.getvalue())
