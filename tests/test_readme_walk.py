"""The README's workflow on real data, typed as a user types it: every `python -m cli` line of its phase-1 block and
of its raw-images/generation block, verbatim and in order, each in a fresh process (stdout a pipe, as under SLURM),
with tiny models (`tiny-models`) on the toy tree (`toy-data`). Only the `local*.yaml` files are the test's: the
README's own `local.yaml` example plus tiny sizes and a CPU."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pandas as pd
import pytest
import torch
import yaml

from cli_runner import REPO, run_cli
from feature_cache.store import FeatureStore

pytestmark = pytest.mark.slow
TINY_PHASE1 = {"trainer": {"accelerator": "cpu", "devices": 1},
               "model": {"init_args": {"num_noises": 2, "autocast_dtype": "float32"}},
               "data": {"init_args": {"resolution": 64, "batch_size": 4, "num_workers": 0, "clip_input": "resize"}}}
TINY_GENERATE = {"trainer": {"accelerator": "cpu"}, "num_images": 3,
                 "model": {"init_args": {"resolution": 64, "num_inference_steps": 2, "num_posterior_samples": 2,
                                         "posterior_steps": 1, "aleatoric_steps": [0], "num_perturbations": 2}}}
TINY_ENSEMBLE = {"trainer": {"accelerator": "cpu"},
                 "model": {"init_args": {"num_members": 2, "steps": 2, "batch_size": 2}},
                 "data": {"init_args": {"resolution": 64, "batch_size": 2, "num_workers": 0}}}


def readme_section(heading: str) -> str:
    return (REPO / "README.md").read_text().split(heading, 1)[1]


def readme_block(heading: str, first_line: str) -> list[str]:
    """The `python -m cli` lines of the README code block under `heading` that holds `first_line`, in order."""
    for block in readme_section(heading).split("```bash\n")[1:]:
        lines = [line.strip() for line in block.split("```", 1)[0].splitlines()]
        if any(line.startswith(first_line) for line in lines):
            return [line for line in lines if line.startswith("python -m cli ")]
    pytest.fail(f"no README code block under {heading!r} holds {first_line!r}")


def readme_yaml(heading: str, first_line: str) -> dict:
    """The README's YAML example that starts with the comment `first_line`."""
    for block in readme_section(heading).split("```yaml\n")[1:]:
        text = block.split("```", 1)[0]
        if text.startswith(first_line):
            return yaml.safe_load(text)
    pytest.fail(f"no README yaml block under {heading!r} starts with {first_line!r}")


def run_line(line: str, cwd) -> str:
    """A documented line in a fresh process, exactly as written (`python` is this interpreter)."""
    result = run_cli(shlex.split(line)[3:], cwd=cwd, subprocess_=True)
    assert result.returncode == 0, f"{line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_readme_workflow_lines_run_verbatim(tmp_path):
    """Bugs caught: README lines that cannot run as written (no val store for `separability`, placeholder model
    paths, the posterior path differing between laplace-fit and precompute, `--trainer.devices 8` forced on every
    machine, a tree or prompt file the lines expect that no documented command builds, a `predict` checkpoint
    path that `fit` does not write, a `local.yaml` example that does not train), and outputs outside git-ignored
    places."""
    heading = "## The workflow on real data"
    phase1 = readme_block(heading, "python -m cli tiny-models models")
    assert phase1[:2] == ["python -m cli tiny-models models", "python -m cli toy-data --out data"]
    assert len(phase1) == 10 and any("--store cache/val.zarr" in line for line in phase1), phase1
    fit = readme_block(heading, "python -m cli fit ")[0]
    tools = readme_block(heading, "python -m cli predict ")
    assert [line.split()[3] for line in tools] == ["predict", "robustness", "generate", "ensemble-fit"], tools
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "local_phase1.yaml").write_text(yaml.safe_dump(TINY_PHASE1))
    local = readme_yaml(heading, "# local.yaml")
    local["trainer"]["max_epochs"] = 2
    local["data"]["init_args"]["batch_size"] = 8
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    (tmp_path / "local_generate.yaml").write_text(yaml.safe_dump(TINY_GENERATE))
    (tmp_path / "local_ensemble.yaml").write_text(yaml.safe_dump(TINY_ENSEMBLE))

    for line in [*phase1, fit, *tools]:
        run_line(line, tmp_path)

    assert (tmp_path / "posteriors/sd15_conv_out_t200.pt").is_file()
    for name, generators in (("sdv4-train", ["imagenet_ai_0419_sdv4"]),
                             ("val", ["imagenet_ai_0419_sdv4", "imagenet_glide"])):
        store = FeatureStore.open(tmp_path / "cache" / f"{name}.zarr")
        assert store.generator_names == generators and not store.incomplete_groups() and not store.verify()
    assert (tmp_path / "report/separability/separability.md").is_file()
    assert sorted(p.name for p in (tmp_path / "report/separability/plots").iterdir())
    scored = pd.read_csv(tmp_path / "preds.csv")
    images = sorted((tmp_path / "data/GenImage/imagenet_glide/val/ai").iterdir())
    assert len(scored) == len(images) == 4 and (scored["error"].isna()).all()
    assert scored["p_fake"].between(0, 1).all()
    robustness = next((tmp_path / "robustness").glob("*.csv"))
    assert len(pd.read_csv(robustness)) > 0
    generated = pd.read_csv(tmp_path / "data/gen_sd15/generation.csv")
    assert len(generated) == 3 and len(list((tmp_path / "data/gen_sd15/fake").iterdir())) == 3
    members = torch.load(tmp_path / "members/sd15_conv_out_t200.pt", weights_only=True)
    assert members  # the members file ensemble-fit writes, loadable without pickle

    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "shards/x", "cache/x",
                              "posteriors/x", "report/x", "members/x", "robustness/x", "models/x", "data/x",
                              "preds.csv", "local_phase1.yaml", "local.yaml", "local_generate.yaml",
                              "local_ensemble.yaml"], capture_output=True, text=True).stdout.split()
    assert len(ignored) == 13, ignored
