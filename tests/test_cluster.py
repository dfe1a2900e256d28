"""Multi-node launches as users run them on a cluster, simulated on this machine: 2 "nodes" × 1 rank.

SLURM: one process per node with the variables `srun` sets (Lightning's SLURMEnvironment reads them);
torchrun: one `torchrun --nnodes 2 --node_rank K` agent per node (TorchElasticEnvironment). Gloo on CPU,
MASTER_ADDR=127.0.0.1. Every store is compared array by array and file by file with a 1-rank run. The launches are
real processes (the launcher's variables, kill -9 of a node); the 1-rank references and reruns on one node run
in-process through the same entry point (`tests/cli_runner.py`), with the same one CPU thread.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.demo_data import build_demo_images
from datamodules.shards import convert
from feature_cache.locks import LOCK_FILE
from feature_cache.store import FeatureStore

from cli_runner import run_cli
from workflow_stores import build_store, local_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FEATURES = ("lare", "clip_layer3", "clip_pooled")  # no posterior needed: the launch, not the maps, is under test
TARS = 6
SDV4, GLIDE = "imagenet_ai_0419_sdv4", "imagenet_glide"


@pytest.fixture(scope="module")
def setup(tiny_model_paths, tmp_path_factory) -> dict[str, Path]:
    """12 demo images at 64 px in 6 tars of 2 (3 per rank with 2 ranks)."""
    root = tmp_path_factory.mktemp("cluster")
    images = build_demo_images(root / "images", {"val": 3}, tile_size=64)
    convert("genimage", images, "val", root / "shards", shard_size=2, workers=1)
    return {"root": root, "shards": root / "shards", **tiny_model_paths}


def _cli_args(setup: dict[str, Path], store: Path, *extra: str) -> list[str]:
    return ["precompute", "--config", str(REPO / "configs" / "precompute.yaml"),
            "--model.init_args.sd", str(setup["sd"]), "--model.init_args.clip", str(setup["clip"]),
            "--model.init_args.posterior", "null", "--model.init_args.num_noises", "2",
            "--model.init_args.outputs", f"[{','.join(FEATURES)}]", "--model.init_args.autocast_dtype", "float32",
            "--data.init_args.shards", str(setup["shards"]), "--data.init_args.resolution", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "1",
            "--trainer.accelerator", "cpu", "--store", str(store), *extra]


def _env(**extra: str) -> dict[str, str]:
    """One CPU thread per process (bit-identity across rank counts needs equal thread counts)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _slurm_env(node: int, nodes: int, port: int) -> dict[str, str]:
    """What `srun --nodes N --ntasks-per-node 1` sets for the task on node `node` (plus the master address),
    and the store lock of a shared filesystem without a trusted flock (docs/cluster.md)."""
    return _env(FEATURE_STORE_LOCK="file", SLURM_NTASKS=str(nodes), SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(node), SLURM_LOCALID="0",
                SLURM_NODEID=str(node), SLURM_NNODES=str(nodes), SLURM_NODELIST=f"node[001-{nodes:03d}]",
                SLURM_JOB_ID="4242", SLURM_JOB_NAME="precompute", SLURM_STEP_ID="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _nodes(nodes: int) -> tuple[str, ...]:
    return "--trainer.num_nodes", str(nodes), "--trainer.devices", "1"


def _launch_slurm(setup: dict[str, Path], args: list[str], nodes: int = 2) -> list[subprocess.Popen]:
    """One `python -m cli ARGS` per node, as `srun` starts them (the job script's one line)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "cli", *args, *_nodes(nodes)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_slurm_env(node, nodes, port), cwd=setup["root"],
                             start_new_session=True)
            for node in range(nodes)]


def _launch_torchrun(setup: dict[str, Path], args: list[str], nodes: int = 2) -> list[subprocess.Popen]:
    """One `torchrun --nnodes N --node_rank K ... -m cli ARGS` per node (the documented line)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                              "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                              "--master_port", str(port), "-m", "cli", *args, *_nodes(nodes)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                             cwd=setup["root"], start_new_session=True)
            for node in range(nodes)]


def _wait(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        results.append((process.returncode, out, err))
    return results


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts its workers in their own sessions: killpg misses them)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += parents.get(tree[-1], [])
    return tree


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(process: subprocess.Popen) -> None:
    """kill -9 a whole "node": the launched process and its descendants (dataloader worker, torchrun's worker)."""
    for pid in _process_tree(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate()


def _assert_bit_identical(a: Path, b: Path) -> None:
    """Every array (read back) and every chunk/shard file (bytes) equal."""
    one, other = FeatureStore.open(a), FeatureStore.open(b)
    for name in FEATURES:
        assert one.read(name).tobytes() == other.read(name).tobytes(), f"{name} differs"
    for group in one.groups:
        assert np.array_equal(one.flags(group), other.flags(group))
    files = {p.relative_to(a).as_posix(): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()
             and "/c/" in p.relative_to(a).as_posix()}
    theirs = {p.relative_to(b).as_posix(): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()
              and "/c/" in p.relative_to(b).as_posix()}
    assert sorted(files) == sorted(theirs) and [k for k in files if files[k] != theirs[k]] == []


def _written_tars(stdout: str, store: Path) -> dict[int, list[str]]:
    """Tars each rank wrote, from the writer's plain per-tar log lines ("writing S (rank R): ... (shard-K)")."""
    tars: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith(f"writing {store.name} (rank "):
            rank = int(line.split("(rank ")[1].split(")")[0])
            tars.setdefault(rank, []).append(line.rsplit("(", 1)[1].rstrip(")"))
    return tars


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """The 1-rank store every launch is compared with."""
    store = setup["root"] / "one.zarr"
    result = run_cli(_cli_args(setup, store), env=_env(), cwd=setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{TARS}/{TARS} tars done" in result.stdout
    return store


@pytest.mark.parametrize("launch", [_launch_slurm, _launch_torchrun], ids=["srun", "torchrun"])
def test_two_nodes_write_the_store_of_one_rank_each_tar_by_one_rank(setup, reference, launch):
    """Catches ranks derived wrongly from the launcher's variables (both nodes rank 0: every tar computed twice,
    or a world of 1 per node), rows lost or computed differently across nodes, a tar written by two ranks,
    a summary printed by each node or before the other node finished, and a zero exit with a failed node."""
    store = setup["root"] / f"{launch.__name__}.zarr"
    results = _wait(launch(setup, _cli_args(setup, store)))
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
    _assert_bit_identical(reference, store)
    assert not (store / LOCK_FILE).exists()  # the srun runs' lock file, released by rank 0 at the end
    summaries = [[line for line in out.splitlines() if f"{TARS}/{TARS} tars done" in line] for _, out, _ in results]
    assert len(summaries[0]) == 1 and summaries[1] == [], summaries  # one line, rank 0 = node 0, after the barrier
    written = {}
    for _, out, _ in results:
        written.update(_written_tars(out, store))
    assert sorted(written) == [0, 1] and all(len(tars) == TARS // 2 for tars in written.values()), written
    every = written[0] + written[1]
    assert sorted(every) == sorted(t["name"] for t in FeatureStore.open(store).shard_table), written  # each once


@pytest.mark.parametrize("launch", [_launch_slurm, _launch_torchrun], ids=["srun", "torchrun"])
def test_kill_one_node_then_rerun_on_one_node_gives_the_same_store(setup, reference, launch):
    """kill -9 of node 1 after its first tar; node 0, left alone, must end with a non-zero exit and no success
    summary (the job's status is what `srun` and torchrun report: a node that hangs on its dead peer, or
    exits 0 after printing "6/6 tars done", hides the failure); then a rerun with 1 node. Catches that, a
    half-written tar trusted on resume, done markers of the dead node lost or miscounted, a store that depends
    on the node count, and (srun, FEATURE_STORE_LOCK=file) a dead holder's lock file blocking the rerun."""
    store = setup["root"] / f"killed_{launch.__name__}.zarr"
    nodes = launch(setup, _cli_args(setup, store))
    for line in nodes[1].stdout:  # node 1's plain log: one line per tar it completed
        if line.startswith(f"writing {store.name} (rank 1)"):
            break
    trees = [_process_tree(node.pid) for node in nodes]
    _kill(nodes[1])
    try:
        out, err = nodes[0].communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill(nodes[0])
        pytest.fail("node 0 still ran 300 s after node 1 was killed: it hangs on its dead peer")
    assert nodes[0].returncode != 0, "node 0 exited 0 although node 1 died: the job would report success"
    assert f"{TARS}/{TARS} tars done" not in out, out[-2000:]
    assert not [pid for tree in trees for pid in tree if _running(pid)], "a process of the failed job survived"
    partial = len(FeatureStore.open(store).done_tars("g0"))
    assert 1 <= partial < TARS, f"the kill should land mid-run, {partial}/{TARS} tars were done"
    lock_file = launch is _launch_slurm  # srun runs take the lock file (flock runs never create one)
    # Node 0 either died holding it or released it on seeing rank 1 die (gloo's error reaches it first under
    # load): either way the rerun must not be blocked (takeover of a dead holder: tests/test_store_locks.py).
    assert lock_file or not (store / LOCK_FILE).exists()
    result = run_cli(_cli_args(setup, store), env=_env(FEATURE_STORE_LOCK="file" if lock_file else "flock"),
                     cwd=setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: skipped {partial} of {TARS} tars" in result.stdout
    _assert_bit_identical(reference, store)
    assert not (store / LOCK_FILE).exists()  # taken over (same host, dead pid) by the rerun, released at its end


def _fit_args(setup: dict[str, Path], command: str, output: Path) -> list[str]:
    config = {"laplace-fit": "laplace_fit.yaml", "ensemble-fit": "ensemble_fit.yaml"}[command]
    extra = (["--model.init_args.num_noises", "2"] if command == "laplace-fit" else
             ["--model.init_args.num_members", "2", "--model.init_args.steps", "2", "--model.init_args.batch_size", "2"])
    return [command, "--config", str(REPO / "configs" / config), "--model.init_args.sd", str(setup["sd"]),
            "--model.init_args.output", str(output), *extra, "--data.init_args.shards", str(setup["shards"]),
            "--data.init_args.resolution", "64", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(output.parent)]


@pytest.mark.parametrize(("command", "launch"), [("laplace-fit", _launch_slurm), ("ensemble-fit", _launch_torchrun)],
                         ids=["laplace-fit-srun", "ensemble-fit-torchrun"])
def test_two_nodes_fit_the_file_of_one_rank(setup, command, launch):
    """The docs' multi-node recipes for the phase-1 fits. Catches sums all-reduced over one node only (each node
    writing its own half-data posterior), images encoded on both nodes, and members trained from a rank's data."""
    one, two = setup["root"] / command / "one.pt", setup["root"] / command / "two.pt"
    one.parent.mkdir(exist_ok=True)
    single = run_cli(_fit_args(setup, command, one), env=_env(), cwd=setup["root"])
    assert single.returncode == 0, single.stderr[-3000:]
    results = _wait(launch(setup, _fit_args(setup, command, two)))
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert tensors and sorted(a) == sorted(b)
    for name in tensors:  # the all-reduce adds the nodes' partial sums in another order than one rank's loop
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=0, msg=name)


@pytest.fixture(scope="module")
def phase2(tmp_path_factory) -> Path:
    """A user's directory for phase 2: a train store, a test store of 21 rows (odd: 2 ranks need a padded row)."""
    root = tmp_path_factory.mktemp("cluster_phase2")
    strengths = {SDV4: 1.5, GLIDE: 0.4, "ldm": 1.0}
    train = build_store(root / "train.zarr", [SDV4], strengths, 32)
    test = build_store(root / "val.zarr", [SDV4, GLIDE, "ldm"], strengths, 7, seed=1)
    local_config(root / "local.yaml", [train], [test], Path("runs"), epochs=1)
    return root


def _phase2_args(root: Path, command: str, *extra: str) -> list[str]:
    return [command, "--config", str(REPO / "configs" / "deua.yaml"), "--config", str(root / "local.yaml"), *extra]


def test_phase2_fit_and_test_on_two_nodes_score_every_row_once(phase2):
    """`fit` on 2 nodes (srun), then `test` of its checkpoint on 1 rank and on 2 nodes (torchrun). Catches a
    second run directory chosen by the other node, a row the padding sampler repeats scored twice (21 rows
    over 2 ranks), a row lost, and a per-generator table that depends on the rank count."""
    results = _wait(_launch_slurm({"root": phase2}, _phase2_args(phase2, "fit")))
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
    assert sorted(p.name for p in (phase2 / "runs" / "deua").iterdir()) == ["both-seed0"]
    run_dir = phase2 / "runs" / "deua" / "both-seed0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    single = run_cli(_phase2_args(phase2, "test", "--ckpt_path", str(checkpoint)), env=_env(), cwd=phase2)
    assert single.returncode == 0, single.stderr[-3000:]
    one_table = (run_dir / "protocol_table.csv").read_text()
    one_rows = pd.read_csv(run_dir / "test_predictions.csv")
    results = _wait(_launch_torchrun({"root": phase2},
                                     _phase2_args(phase2, "test", "--ckpt_path", str(checkpoint))))
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
    two_rows = pd.read_csv(run_dir / "test_predictions.csv")
    assert sorted(two_rows["row"]) == list(range(21)) and sorted(one_rows["row"]) == list(range(21))
    key = ["store", "row"]
    one_rows, two_rows = one_rows.sort_values(key).reset_index(drop=True), two_rows.sort_values(key).reset_index(drop=True)
    assert one_rows.drop(columns="p_fake").equals(two_rows.drop(columns="p_fake"))
    np.testing.assert_allclose(one_rows["p_fake"], two_rows["p_fake"], rtol=1e-5, atol=1e-6)
    assert (run_dir / "protocol_table.csv").read_text() == one_table
