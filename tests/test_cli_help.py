"""Every subcommand's --help runs; unimplemented ones never pretend to work.

In-process through the CLI's entry point (`tests/cli_runner.py`), except where a fresh interpreter is the point:
the top-level help and what `--help` imports, and one Trainer subcommand's help (`fit`: Lightning's parser built
from nothing, as a user's first command builds it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.commands import PLAIN_COMMANDS, TRAINER_SUBCOMMANDS
from cli_runner import CliResult, run_cli


def _run(*args: str, subprocess_: bool = False) -> CliResult:
    return run_cli(list(args), subprocess_=subprocess_, timeout=300)


@pytest.mark.parametrize("subcommand", [*TRAINER_SUBCOMMANDS, *PLAIN_COMMANDS])
def test_subcommand_help_runs(subcommand):
    result = _run(subcommand, "--help", subprocess_=subcommand == "fit")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and subcommand.replace("-", "_") in result.stdout.replace("-", "_")


def test_top_level_help_lists_every_subcommand():
    result = _run("--help", subprocess_=True)
    assert result.returncode == 0
    for name in [*TRAINER_SUBCOMMANDS, *PLAIN_COMMANDS]:
        assert name in result.stdout


def test_help_imports_no_torch_or_lightning():
    """`python -m cli --help` and plain commands' `--help` import neither torch nor lightning (not timed: the
    figures are benchmarks/startup.py's), nor does `shards`' own module. Catches a module-level heavy import in the
    dispatcher, the command table, a plain command's module, the `datamodules` package or `core.progress` (which
    put ~10 s of Lightning start-up on every `shards` run and its worker processes)."""
    code = ("import sys\nfrom cli.__main__ import main\n"
            "for argv in (['--help'], ['compare', '--help'], ['verify', '--help'], ['grid', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as end:\n        assert not end.code, end\n"
            "import datamodules.shards\n"
            "print(sorted(name for name in ('torch', 'lightning', 'zarr', 'pandas') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout.splitlines()[-1]


def test_unknown_subcommand_fails_with_one_line():
    result = _run("precomptue")
    assert result.returncode != 0 and "unknown subcommand 'precomptue'" in result.stderr


def test_tiny_models_command_writes_loadable_models(tmp_path):
    result = _run("tiny-models", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sd" / "unet" / "config.json").is_file()
    assert (tmp_path / "clip" / "open_clip_config.json").is_file()


def test_bad_input_is_one_line_naming_it(tmp_path):
    result = _run("precompute", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "precompute.yaml"), "--model.init_args.sd", str(tmp_path / "no-sd"),
                  "--store", str(tmp_path / "store.zarr"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("python -m cli")]
    assert len(errors) == 1 and "Stable Diffusion weights not found at" in errors[0] and "no-sd" in errors[0]
    assert "Traceback" not in result.stderr
    result = _run("predict", "--ckpt", str(tmp_path / "missing.ckpt"), "--data", str(tmp_path))
    assert result.returncode != 0 and "checkpoint" in result.stderr and "missing.ckpt: no such file" in result.stderr


@pytest.mark.parametrize(("args", "line"), [
    (["toy-data", "--ou", "OUT"], "toy-data: unrecognized arguments: --ou OUT (did you mean 'out'?)"),
    (["toy-data", "--out", "OUT", "--seed", "x"], "toy-data: --seed: Expected a <class 'int'>. Got value: x"),
    (["fit", "--config", "DEUA", "--trainer.max_epoch", "3", "--print_config"],
     "fit: unrecognized arguments: --trainer.max_epoch 3 (did you mean 'trainer.max_epochs'?)"),
    (["fit", "--config", "DEUA", "--trainer.max_epochs", "x", "--print_config"],
     "fit: --trainer.max_epochs: 'x' is not one of [<class 'int'>, <class 'NoneType'>]"),
])
def test_an_abbreviated_option_or_a_bad_value_is_refused_in_one_line(tmp_path, args, line):
    """Catches argparse's prefix matching (`--trainer.max_epoch 3` silently set max_epochs, `--ou` meant `--out`)
    in the Trainer subcommands and the plain commands, a usage block before the line, and a Union's bare "Does not
    validate against any of the Union subtypes" instead of the value and the types it is not."""
    out = tmp_path / "out"
    deua = Path(__file__).resolve().parents[1] / "configs" / "deua.yaml"
    args = [str(out) if a == "OUT" else str(deua) if a == "DEUA" else a for a in args]
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[0] == "python -m cli " + line.replace("OUT", str(out)), result.stderr
    assert len(result.stderr.splitlines()) == 2 and not out.exists()


@pytest.mark.parametrize("option, value, arguments", [
    ("--model.help", "DEUADetector", ("guidance", "backbone", "asym_weight", "margin_real", "lr")),
    ("--model.help", "LaRE2Detector", ("guidance", "pooled_dim", "spatial", "channel", "plateau_patience")),
    ("--data.help", "FeatureCacheDataModule", ("features", "train", "test", "val_fraction", "images")),
])
def test_class_help_describes_every_argument(option, value, arguments):
    """Bug caught: `--model.help` listing bare types because docstrings are not in jsonargparse's Args format."""
    result = _run("fit", option, value)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    prefix = option.split(".")[0]
    for name in arguments:
        entry = text.split(f"{prefix}.{name} ")[-1].split("(type:")[0]  # the option's own help line
        words = [w for w in entry.split() if not w.startswith(("--", "[", "{")) and not w.rstrip(",").isupper()]
        assert len(words) >= 3, f"{prefix}.{name} has no description: {entry!r}"


def test_bare_flags_and_multi_word_lists(tmp_path, capsys):
    """Bugs caught: `--overwrite` needing `true`; `--metrics a b` rejected as `Expected a <class 'list'>`."""
    from PIL import Image

    from cli.__main__ import main

    for label in ("real", "fake"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(tmp_path / "images" / label / f"{k}.png")
    command = ["shards", "--layout", "folder", "--root", str(tmp_path / "images"), "--split", "train",
               "--out", str(tmp_path / "shards"), "--workers", "1"]
    main(command)
    main([*command, "--overwrite"])  # a bare flag: replaces the shards instead of refusing
    assert "4 images in 1 shards" in capsys.readouterr().out
    from cli.argv import shell_style
    from cli.commands import plain_command

    compare, grid = plain_command("compare"), plain_command("grid")

    assert shell_style(compare, ["runs", "--metrics", "test_acc", "test_auroc", "--matrix"]) == [
        "runs", "--metrics+", "test_acc", "--metrics+", "test_auroc", "--matrix", "true"]
    assert shell_style(grid, ["rows", "--seeds", "0", "1", "--extra", "[a.yaml, b.yaml]"]) == [
        "rows", "--seeds+", "0", "--seeds+", "1", "--extra", "[a.yaml, b.yaml]"]
