"""Per-map separability before any training: AUROC/AP of scalar summaries of every guidance map in a store.

For every store (one protocol each), every guidance map it holds and every summary below, the rows are
scored per generator exactly as `reports.evaluation.protocol_table` scores a detector (reals pooled
against each fake-only generator, as DRCT-style tables do), with a stratified bootstrap 95 % interval.
Beside each generator stand the format-only and double-JPEG reference AUROCs on the same rows, so a map
that merely tracks file format or compression history is visible.

Summaries of one row's map x (C×H×W), in `map_summaries`:
- mean, median, p95: over all C·H·W values (quantiles interpolated linearly, as numpy's default);
- spatial_std: standard deviation over the H×W pixels of the channel-mean map;
- highpass_energy: mean over channels and interior pixels of the squared 4-neighbour Laplacian
  (4·x[i,j] − x[i−1,j] − x[i+1,j] − x[i,j−1] − x[i,j+1])², the map's fine-scale energy.

With `--direction_from`, everything chosen is chosen on that separate split alone, the scored stores only
report: per (map, summary) the direction (is a higher summary more fake?) is "higher" when the split's
generator-mean AUROC interval lies above 0.5, "lower" when below, and "undetermined" when it contains 0.5 (then
both directions are scored, labelled); per map the summary is the one whose AUROC there is farthest from 0.5.
Without it the direction is declared (default higher) and the best summary is picked on the scored rows, which
the report says (optimistic: the best of five), showing all five.

Features with many channels (the CLIP maps and vectors, and guidance maps with ≥ `PROBE_MIN_CHANNELS`
channels) are scored by a linear probe: logistic regression on standardised channel means (a vector feature as
it is), fitted on the direction split, else cross-fitted on the scored rows (two class-stratified halves).

Streaming: stores are read one tar (one Zarr shard) at a time, the next tar decoded in a thread while the
current one is summarised; only the (rows × summaries) table stays in memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from feature_cache.store import FeatureStore
from reports.evaluation import Predictions, markdown_table, protocol_table, generator_groups
from reports.format_reference import FormatOnlyClassifier, confound_note, store_metadata
from reports.jpeg_reference import DoubleJpegClassifier, fit_double_jpeg, has_images, store_jpeg_features

SUMMARIES = ("mean", "median", "p95", "spatial_std", "highpass_energy")
PROBES = {3: "linear probe (channel means)", 1: "linear probe (the vector)"}  # summary column, by feature ndim
PROBE_MIN_CHANNELS = 8  # a guidance map with this many channels is also probed (a scalar summary drops too much)
REFERENCES = ("format-only", "double-JPEG")
_BOOTSTRAP_ELEMENTS = 4_000_000  # replicates × rows held at once by the bootstrap
_DECODE_BATCH = 64  # inner chunks per zarr codec call when streaming whole tars


# --- the store, read through these functions only (store format 2) -------------------------------------------

def guidance_maps(store: FeatureStore) -> list[str]:
    """Every guidance map of the store: the features recorded with kind `guidance` (the map registry's)."""
    return [name for name in store.feature_names if store.feature_info(name).kind == "guidance"]


def probe_features(store: FeatureStore) -> list[str]:
    """Features scored by a linear probe: every feature that is not a guidance map (CLIP maps and vectors) and
    every guidance map with at least `PROBE_MIN_CHANNELS` channels."""
    guidance = guidance_maps(store)
    return [name for name in store.feature_names
            if name not in guidance or store.feature_info(name).shape[0] >= PROBE_MIN_CHANNELS]


def map_blocks(store: FeatureStore, names: list[str]) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(start, stop, {map: values in stored dtype}) for each tar in row order, whole Zarr shards per read.

    A block is valid until the next-but-one is requested: blocks alternate between two reused buffers per map
    (fresh 16 MB arrays per tar are page-faulted in on every touch), so a consumer may hold one block while the
    next is read. Whole-tar reads, not `row_batches`' chunk-aligned 32-row calls: for these small rows in
    25-row chunks a tar in 25-row calls cost twice the CPU time (51 vs 25 µs per row, docs/separability.md).
    Zarr decodes the inner chunks of a shard one by one by default; batching 64 of them per codec call cut the
    CPU time of a whole-tar read of 4x32x32 float32 maps in (older) 4-row chunks from 67-84 to 44 µs per row.
    """
    rows = max((stop - start for start, stop in map(store.tar_rows, range(len(store.shard_table)))), default=0)
    buffers = [{name: np.empty((rows, *store.feature_info(name).shape), store.feature_info(name).storage_dtype)
                for name in names} for _ in range(2)]
    for index in range(len(store.shard_table)):
        start, stop = store.tar_rows(index)
        with zarr.config.set({"codec_pipeline.batch_size": _DECODE_BATCH}):
            yield start, stop, {name: store.read(name, start, stop, out=buffer[:stop - start])
                                for name, buffer in buffers[index % 2].items()}


@dataclass
class StoreRows:
    """A store's usable rows for some maps: labelled, no phase-1 error and no non-finite value in those maps'
    groups; with labels and generator names."""

    store: FeatureStore
    rows: np.ndarray
    label: np.ndarray
    generator: np.ndarray

    @classmethod
    def of(cls, store: FeatureStore, maps: list[str]) -> StoreRows:
        labels = store.rows("label").astype(np.int64)
        usable = labels >= 0
        for group in sorted({store.group_of(name) for name in maps}):
            usable &= (store.errors(group) == "") & (store.flags(group)[:, 0] == 0)
        rows = np.flatnonzero(usable)
        if not len(rows):
            raise ValueError(f"feature store {store.path}: no labelled rows without a phase-1 error to score")
        names = np.array(store.generator_names, dtype=object)
        return cls(store, rows, labels[rows], names[store.rows("generator")[rows]])

    @property
    def protocol(self) -> str:
        return str(self.store.pixels.protocol)


# --- summaries ---------------------------------------------------------------------------------------------

_SLAB_ROWS = 64  # rows summarised per numpy pass: a 64-row slab (1 MiB at 4x32x32) stays in cache across the passes


def _sortable(bits: np.ndarray) -> np.ndarray:
    """int32 keys in the order of the float32 values whose bits they are, and back (the map is its own inverse).

    IEEE-754 floats of one sign are ordered like their bit patterns; flipping the magnitude bits of negative
    ones makes the whole int32 order match the float order (-0.0 just below +0.0). numpy partitions int32
    ~1.5x faster than float32, whose comparisons must also order NaNs."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


@functools.lru_cache(maxsize=8)
def _highpass_layout(channels: int, height: int, width: int) -> tuple[np.ndarray, int]:
    """For the Laplacian over a flattened (C·H·W) row, centred on positions W+1 .. C·H·W−W−2: the offsets in
    that range that are not interior pixels of their channel (zeroed), and the number of interior pixels."""
    positions = np.arange(width + 1, channels * height * width - width - 1)
    row, column = positions % (height * width) // width, positions % width
    interior = (row >= 1) & (row <= height - 2) & (column >= 1) & (column <= width - 2)
    return np.flatnonzero(~interior), channels * max(height - 2, 0) * max(width - 2, 0)


def _summarise_slab(flat: np.ndarray, shape: tuple[int, int, int], out: np.ndarray) -> None:
    """`map_summaries` of a few rows (C·H·W float32 values each, C-contiguous) into `out` (rows, 5) float64."""
    count, size = flat.shape
    channels, height, width = shape
    out[:, 0] = flat.mean(1, dtype=np.float64)
    positions = {q: (size - 1) * q for q in (0.5, 0.95)}
    kth = sorted({k for p in positions.values() for k in (math.floor(p), math.ceil(p))})
    keys = np.partition(_sortable(flat.view(np.int32)), kth, axis=1)  # linear-time selection, as numpy.quantile
    picked = dict(zip(kth, _sortable(np.ascontiguousarray(keys[:, kth])).view(np.float32).astype(np.float64).T))
    for column, q in ((1, 0.5), (2, 0.95)):
        low, high = math.floor(positions[q]), math.ceil(positions[q])
        out[:, column] = picked[low] + (positions[q] - low) * (picked[high] - picked[low])
    out[np.isnan(flat).any(1), 1:3] = np.nan  # as numpy.quantile (the int keys would order a NaN like a number)
    out[:, 3] = flat.reshape(count, channels, height * width).mean(1).std(1, dtype=np.float64)
    border, interior = _highpass_layout(channels, height, width)
    if not interior:
        out[:, 4] = np.nan
        return
    # 4-neighbour Laplacian on the flat rows: neighbours are ±1 (columns) and ±W (rows) positions away; results
    # centred on border pixels (or spanning two channels) are zeroed. Contiguous slices vectorise; 4-D ones did not.
    laplacian = flat[:, 1:-2 * width - 1] + flat[:, 2 * width + 1:-1]
    laplacian += flat[:, width:-width - 2]
    laplacian += flat[:, width + 2:-width]
    laplacian -= 4 * flat[:, width + 1:-width - 1]
    laplacian[:, border] = 0
    out[:, 4] = np.einsum("ij,ij->i", laplacian, laplacian, dtype=np.float64) / interior


def map_summaries(values: np.ndarray) -> np.ndarray:
    """(B, len(SUMMARIES)) float64 summaries of B maps (B, C, H, W) in any float dtype (see module docstring).

    All five come from one pass over cache-sized slabs of rows, in float32 with float64 accumulation."""
    maps = np.ascontiguousarray(values, dtype=np.float32)
    shape = maps.shape[1:]
    flat = maps.reshape(len(maps), math.prod(shape))
    out = np.empty((len(maps), len(SUMMARIES)))
    for start in range(0, len(maps), _SLAB_ROWS):
        _summarise_slab(flat[start:start + _SLAB_ROWS], shape, out[start:start + _SLAB_ROWS])
    return out


def summarise_store(store: FeatureStore, names: list[str], workers: int = 2,
                    progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """{map: (num_rows, len(SUMMARIES)) float32} over every row, streaming one tar at a time: the next tar is
    decoded in a thread while this one's rows are summarised by `workers` threads (numpy's selection and
    ufuncs release the GIL), each writing its share of rows straight into the table."""
    summaries = {name: np.zeros((store.num_rows, len(SUMMARIES)), dtype=np.float32) for name in names}
    blocks = map_blocks(store, names)

    def summarise(name: str, values: np.ndarray, start: int) -> None:
        summaries[name][start:start + len(values)] = map_summaries(values)

    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        pending = pool.submit(next, blocks, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, blocks, None)  # decode the next tar while this one is summarised
            start, stop, block = item
            step = max(1, -(-(stop - start) // workers))
            shares = [(name, values[first:first + step], start + first) for name, values in block.items()
                      for first in range(0, stop - start, step)]
            for done in [pool.submit(summarise, *share) for share in shares]:
                done.result()
            if progress is not None:
                progress(stop - start)
    return summaries


# --- metrics -----------------------------------------------------------------------------------------------

def weighted_auroc_ap(score: np.ndarray, label: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP of one score under each row of `weights` (R, n) (bootstrap multiplicities).

    With unit weights these are torchmetrics' binary_auroc (ties count ½) and binary_average_precision
    (step-wise Σ ΔRecall·Precision over distinct thresholds); a test holds them equal. Sorting happens
    once, each replicate is a few cumulative sums.
    """
    order = np.argsort(-score, kind="stable")
    ordered, fake = score[order], label[order] == 1
    w = weights[:, order]
    w_fake, w_real = np.where(fake, w, 0), np.where(fake, 0, w)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # distinct thresholds, descending
    if len(starts) < len(ordered):  # ties: one step per distinct score
        w_fake, w_real = np.add.reduceat(w_fake, starts, axis=1), np.add.reduceat(w_real, starts, axis=1)
    true_pos, false_pos = np.cumsum(w_fake, axis=1, dtype=np.int64), np.cumsum(w_real, axis=1, dtype=np.int64)
    total_fake, total_real = true_pos[:, -1].astype(np.float64), false_pos[:, -1].astype(np.float64)
    # Σ over fakes of (reals strictly below + ½ reals tied) = Σ w_fake·(total_real − false_pos + ½ w_real)
    below = np.einsum("ij,ij->i", w_fake, total_real[:, None] - false_pos + 0.5 * w_real, dtype=np.float64)
    auroc = below / (total_fake * total_real)
    ap = np.einsum("ij,ij->i", w_fake, true_pos / np.maximum(true_pos + false_pos, 1), dtype=np.float64) / total_fake
    return auroc, ap


def bootstrap_weights(label: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, n) multiplicities of a bootstrap resample stratified by class (class sizes kept)."""
    weights = np.zeros((replicates, len(label)), dtype=np.int32)
    for value in np.unique(label):
        members = np.flatnonzero(label == value)
        draws = rng.integers(0, len(members), (replicates, len(members)))
        offsets = np.arange(replicates)[:, None] * len(members)
        counts = np.bincount((draws + offsets).ravel(), minlength=replicates * len(members))
        weights[:, members] = counts.reshape(replicates, len(members))
    return weights


def bootstrap_replicates(score: np.ndarray, label: np.ndarray, replicates: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP of `replicates` stratified bootstrap resamples of one generator's rows."""
    rng = np.random.default_rng(seed)
    order = np.argsort(-score, kind="stable")  # sorted once: each chunk's own stable sort is then linear
    score, label = score[order], label[order]
    chunk = max(1, _BOOTSTRAP_ELEMENTS // max(1, len(score)))
    parts = [weighted_auroc_ap(score, label, bootstrap_weights(label, min(chunk, replicates - done), rng))
             for done in range(0, replicates, chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def score_table(score: np.ndarray, label: np.ndarray, generator: np.ndarray, replicates: int,
                seed: int) -> list[dict]:
    """protocol_table's per-generator AUROC/AP (and the average row) with 95 % percentile bootstrap intervals.

    The average row's interval comes from the mean over generators of each replicate.
    """
    # protocol_table scores like a detector's p_fake: float32 in [0, 1] (torchmetrics takes anything else for logits
    # and squashes it with a sigmoid, tying every summary above ~17; float32 flushes DEU's ~1e-40 energies to 0).
    # AUROC/AP depend only on the order, so it gets the scores' dense ranks scaled into [0, 1].
    ranks = np.unique(score, return_inverse=True)[1] / max(len(score) - 1, 1)
    table = protocol_table(Predictions(np.where(np.isnan(score), np.nan, ranks), label, generator))
    draws = {}
    for k, (name, mask) in enumerate(generator_groups(generator, label)):
        draws[name] = bootstrap_replicates(score[mask], label[mask], replicates, seed + k) if replicates else None
    if replicates and draws:
        draws["average"] = tuple(np.mean([d[i] for d in draws.values()], axis=0) for i in (0, 1))
    rows = []
    for row in table:
        bounds = draws.get(row["generator"])
        out = {"generator": row["generator"], "n_real": row["n_real"], "n_fake": row["n_fake"]}
        for metric, i in (("auroc", 0), ("ap", 1)):
            out[metric] = row[metric]
            low, high = np.percentile(bounds[i], [2.5, 97.5]) if bounds is not None else (np.nan, np.nan)
            out[f"{metric}_low"], out[f"{metric}_high"] = float(low), float(high)
        rows.append(out)
    return rows


@dataclass
class SplitChoice:
    """What the direction split decided for one map: per summary its generator-mean AUROC there (higher = fake)
    with the bootstrap interval, the direction(s) to score, and the summary to report."""

    auroc: dict[str, tuple[float, float, float]]  # summary -> (AUROC, low, high)
    directions: dict[str, tuple[str, ...]]  # ("higher",), ("lower",) or ("higher", "lower") when undetermined
    summary: str


def direction_of(auroc: float, low: float, high: float) -> tuple[str, ...]:
    """("higher",) or ("lower",) when the interval lies on one side of 0.5, both when it contains 0.5
    (undetermined; without an interval, only an AUROC of exactly 0.5 or NaN is undetermined)."""
    if np.isnan(low):
        low = high = auroc
    if not low <= 0.5 <= high:
        return ("higher",) if auroc > 0.5 else ("lower",)
    return ("higher", "lower")


def choose_on_split(summaries: dict[str, np.ndarray], rows: StoreRows, replicates: int,
                    seed: int) -> dict[str, SplitChoice]:
    """Per map, the SplitChoice made on these rows alone (the direction split's): directions from each
    summary's generator-mean AUROC interval, the summary whose AUROC is farthest from 0.5."""
    choices = {}
    for name, values in summaries.items():
        auroc = {}
        for k, summary in enumerate(SUMMARIES):
            average = score_table(values[rows.rows, k].astype(np.float64), rows.label, rows.generator, replicates,
                                  seed)[-1]
            auroc[summary] = (average["auroc"], average["auroc_low"], average["auroc_high"])
        distance = {summary: abs(value[0] - 0.5) for summary, value in auroc.items() if not np.isnan(value[0])}
        best = max(distance, key=distance.get) if distance else SUMMARIES[0]
        choices[name] = SplitChoice(auroc, {summary: direction_of(*value) for summary, value in auroc.items()}, best)
    return choices


# --- the linear probe --------------------------------------------------------------------------------------

def pooled_features(store: FeatureStore, name: str, rows: np.ndarray) -> np.ndarray:
    """(len(rows), C) float64 probe inputs: channel means of a (C, ...) feature, a (D,) feature as stored
    (widened from its stored dtype); read a few whole chunks at a time (a tar of 1024×14×14 CLIP maps is 400 MB),
    so a CLIP store never sits in memory at once."""
    from feature_cache.codecs import widen

    info = store.feature_info(name)
    out = np.empty((len(rows), info.shape[0]))
    step = store.chunk_rows(name) * max(1, 128 // store.chunk_rows(name))
    for start in range(0, store.num_rows, step):
        stop = min(start + step, store.num_rows)
        wanted = rows[(rows >= start) & (rows < stop)]
        if not len(wanted):
            continue
        scale = store.read(f"{name}__scale", start, stop) if info.has_scale else None
        values = widen(info.dtype, store.read(name, start, stop), scale).numpy()
        pooled = values.reshape(len(values), info.shape[0], -1).mean(-1, dtype=np.float64)
        out[np.searchsorted(rows, wanted)] = pooled[wanted - start]
    return out


def _probe(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def probe_scores(scored: StoreRows, name: str, fit: StoreRows | None, seed: int) -> np.ndarray:
    """P(fake) of the linear probe on `name` for the scored rows: fitted on `fit`, else cross-fitted (each
    half of the scored rows scored by a probe fitted on the other half)."""
    features = pooled_features(scored.store, name, scored.rows)
    if fit is not None:
        model = _probe(seed).fit(pooled_features(fit.store, name, fit.rows), fit.label)
        return model.predict_proba(features)[:, 1]
    scores = np.empty(len(scored.rows))
    for held_out in _folds(scored.label, seed):
        model = _probe(seed).fit(features[~held_out], scored.label[~held_out])
        scores[held_out] = model.predict_proba(features[held_out])[:, 1]
    return scores


# --- references --------------------------------------------------------------------------------------------

def _folds(label: np.ndarray, seed: int) -> list[np.ndarray]:
    """Two seeded halves, stratified by class: cross-fitting when no separate store is given."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(label), dtype=bool)
    for value in np.unique(label):
        members = rng.permutation(np.flatnonzero(label == value))
        fold[members[: len(members) // 2]] = True
    return [fold, ~fold]


def format_only_scores(scored: StoreRows, fit: StoreRows | None, seed: int) -> np.ndarray:
    """P(fake) from the format-only reference for the scored rows: fitted on `fit`, else cross-fitted."""
    metadata = store_metadata(scored.store, scored.rows)
    if fit is not None:
        return FormatOnlyClassifier().fit(store_metadata(fit.store, fit.rows), fit.label).predict_proba(metadata)
    scores = np.empty(len(scored.rows))
    for held_out in _folds(scored.label, seed):
        model = FormatOnlyClassifier().fit(metadata.select(~held_out), scored.label[~held_out])
        scores[held_out] = model.predict_proba(metadata.select(held_out))
    return scores


def double_jpeg_scores(scored: StoreRows, fit: StoreRows | None, max_fit_rows: int, seed: int) -> np.ndarray | None:
    """P(fake) from the double-JPEG reference: fitted on `fit` (a balanced sample), else cross-fitted."""
    if not has_images(scored.store) or (fit is not None and not has_images(fit.store)):
        return None
    features = store_jpeg_features(scored.store, scored.rows)
    if fit is not None:
        model = fit_double_jpeg([(fit.store, fit.rows, fit.label)], max_fit_rows, seed)
        return model.predict_proba(features)
    scores = np.empty(len(scored.rows))
    for held_out in _folds(scored.label, seed):
        model = DoubleJpegClassifier(seed).fit(features[~held_out], scored.label[~held_out])
        scores[held_out] = model.predict_proba(features[held_out])
    return scores


# --- the report --------------------------------------------------------------------------------------------

def _figure(values: np.ndarray, rows: StoreRows, best: int, directions: list[str], title: str):
    """Per-class histograms of every summary (AUROC [95 % CI] of the summary in its title) and the per-generator
    ROC of the best one."""
    import torch
    from torchmetrics.functional.classification import binary_roc

    from reports.plots import auroc_title, class_histogram, plt

    fig, axes = plt.subplots(1, len(SUMMARIES) + 1, figsize=(3.4 * (len(SUMMARIES) + 1), 3.4))
    signs = [1.0 if direction == "higher" else -1.0 for direction in directions]
    for k, (ax, summary) in enumerate(zip(axes, SUMMARIES)):
        class_histogram(ax, values[:, k], rows.label, summary, bins=40, density=True)
        score = auroc_title(signs[k] * values[:, k], rows.label, rows.generator, "average")
        ax.set_title(f"{summary}{' (best)' if k == best else ''}\n{score}, {directions[k]} = fake", fontsize=8)
    axes[0].legend(fontsize=7)
    roc_ax = axes[-1]
    for name, mask in generator_groups(rows.generator, rows.label):
        fpr, tpr, _ = binary_roc(torch.from_numpy(signs[best] * values[mask, best]).float(),
                                 torch.from_numpy(rows.label[mask]))
        roc_ax.plot(fpr.numpy(), tpr.numpy(), linewidth=1,
                    label=f"{name}: {auroc_title(signs[best] * values[:, best], rows.label, rows.generator, name)}")
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    roc_ax.set_xlabel("false positive rate", fontsize=8)
    roc_ax.set_ylabel("true positive rate", fontsize=8)
    roc_ax.set_title(f"ROC of {SUMMARIES[best]} per generator", fontsize=8)
    roc_ax.tick_params(labelsize=7)
    roc_ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _interval(row: pd.Series, metric: str) -> str:
    if np.isnan(row[f"{metric}_low"]):
        return f"{row[metric]:.3f}"
    return f"{row[metric]:.3f} [{row[f'{metric}_low']:.3f}, {row[f'{metric}_high']:.3f}]"


def _direction_cell(row: pd.Series) -> str:
    if row["method"] == "probe":
        return "P(fake) of the probe"
    return f"{row['direction']} = fake" + (" (undetermined)" if row["direction_source"].startswith("undetermined")
                                          else "")


def _heading(rows: pd.DataFrame, name: str) -> str:
    """What was chosen for one map's rows, and where."""
    first = rows.iloc[0]
    if first["method"] == "probe":
        return f"### {name} · {first['summary']}, {first['direction_source']}\n"
    chosen = rows[rows["chosen"]].iloc[0]
    if chosen["summary_source"] == "best on the scored rows":
        average = rows[(rows["generator"] == "average") & rows["chosen"]]["auroc"].iloc[0]
        return (f"### {name} · best summary on the scored rows: {chosen['summary']} (mean AUROC {average:.3f}; "
                f"picked on the rows it is scored on, so optimistic: the best of {len(SUMMARIES)}; all shown)\n")
    interval = f"{chosen['split_auroc']:.3f}" + ("" if np.isnan(chosen["split_auroc_low"]) else
                                                 f" [{chosen['split_auroc_low']:.3f}, {chosen['split_auroc_high']:.3f}]")
    direction = ("undetermined (the interval contains 0.5: both directions scored)"
                 if chosen["direction_source"].startswith("undetermined") else f"{chosen['direction']} = fake")
    return (f"### {name} · {chosen['summary_source']}: summary {chosen['summary']}, direction {direction} (mean "
            f"AUROC there, higher = fake: {interval}; the other summaries are in separability.csv)\n")


def _markdown(table: pd.DataFrame, notes: dict[str, str], header: str) -> str:
    """One section per store, one table per map (and per probed feature), headed by what was chosen where."""
    parts = [header]
    for store, of_store in table.groupby("store", sort=False):
        parts.append(f"## `{store}` · protocol {of_store['protocol'].iloc[0]}\n{notes[store]}")
        for (name, method), of_map in of_store.groupby(["map", "method"], sort=False):
            parts.append(_heading(of_map, name))
            shown = of_map[of_map["chosen"]] if of_map["summary_source"].iloc[0].startswith("chosen on") else of_map
            cells = [[r["summary"], _direction_cell(r), r["generator"], str(r["n_real"]), str(r["n_fake"]),
                      _interval(r, "auroc"), _interval(r, "ap"),
                      *(f"{r[c]:.3f}" if not np.isnan(r[c]) else "n/a" for c in ("format_only_auroc", "double_jpeg_auroc"))]
                     for _, r in shown.iterrows()]
            parts.append(markdown_table(["summary", "direction", "generator", "real", "fake", "AUROC [95 % CI]",
                                         "AP [95 % CI]", "format-only AUROC", "double-JPEG AUROC"], cells))
    return "\n".join(parts)


def separability_report(stores: list[Path], out: Path, direction_from: Path | None = None,
                        direction: str | None = None, tb: bool = False, bootstrap: int = 1000,
                        double_jpeg: bool = True, max_fit_rows: int = 4000, workers: int = 2,
                        seed: int = 0) -> pd.DataFrame:
    """Write separability.{csv,md}, plots/STORE_MAP.png (and TensorBoard under tb/) into `out`; return the table."""
    from rich.progress import Progress

    from reports.plots import save_figure

    if direction_from is not None and direction is not None:
        raise ValueError("separability: give --direction_from or --direction, not both")
    if direction not in (None, "higher", "lower"):
        raise ValueError(f"separability: --direction {direction!r} must be higher or lower")
    if not stores:
        raise ValueError("separability: --stores is empty; give the feature stores to score, e.g. --stores '[val.zarr]'")
    opened = [FeatureStore.open(path) for path in stores]
    maps = {str(store.path): guidance_maps(store) for store in opened}
    probes = {str(store.path): probe_features(store) for store in opened}
    for store in opened:
        if not maps[str(store.path)] and not probes[str(store.path)]:
            raise ValueError(f"feature store {store.path}: no guidance map or feature to score "
                             f"(features: {store.feature_names})")
    scored = [StoreRows.of(store, sorted({*maps[str(store.path)], *probes[str(store.path)]})) for store in opened]
    needed = sorted({name for names in maps.values() for name in names})
    needed_probes = sorted({name for names in probes.values() for name in names})
    fit = None
    if direction_from is not None:
        fit_store = FeatureStore.open(direction_from)
        missing = sorted((set(needed) - set(guidance_maps(fit_store))) | (set(needed_probes) - set(fit_store.feature_names)))
        if missing:
            raise ValueError(f"feature store {direction_from} (--direction_from): lacks the features {missing}")
        fit = StoreRows.of(fit_store, sorted({*needed, *needed_probes}))
    out = Path(out)
    stems = [r.store.path.stem for r in scored]
    records, notes, figures = [], {}, {}
    probe_source = f"fitted on {direction_from}" if fit is not None else "cross-fitted on the scored rows (2 folds)"
    with Progress() as progress:
        def bar(store: FeatureStore):
            task = progress.add_task(f"summaries {store.path.name}", total=store.num_rows)
            return lambda n: progress.advance(task, n)

        choices = {}
        if fit is not None:
            choices = choose_on_split(summarise_store(fit.store, needed, workers, bar(fit.store)), fit, bootstrap, seed)
        for rows in scored:
            path = str(rows.store.path)
            summaries = summarise_store(rows.store, maps[path], workers, bar(rows.store))
            reference_scores = {"format-only": format_only_scores(rows, fit, seed),
                                "double-JPEG": double_jpeg_scores(rows, fit, max_fit_rows, seed) if double_jpeg else None}
            reference_auroc = {name: ({r["generator"]: r["auroc"] for r in
                                       protocol_table(Predictions(s, rows.label, rows.generator))} if s is not None else {})
                               for name, s in reference_scores.items()}
            notes[path] = confound_note({name: reference_auroc[name].get("average") for name in REFERENCES})

            def add(name: str, method: str, summary: str, score: np.ndarray, **columns) -> None:
                for row in score_table(score, rows.label, rows.generator, bootstrap, seed):
                    records.append({"store": path, "protocol": rows.protocol, "map": name, "method": method,
                                    "summary": summary, **columns, **row,
                                    "format_only_auroc": reference_auroc["format-only"].get(row["generator"], np.nan),
                                    "double_jpeg_auroc": reference_auroc["double-JPEG"].get(row["generator"], np.nan)})

            for name in maps[path]:
                values = summaries[name][rows.rows].astype(np.float64)
                if fit is not None:
                    choice = choices[name]
                    best = SUMMARIES.index(choice.summary)
                else:
                    default = (direction or "higher",)
                    choice = SplitChoice({s: (np.nan,) * 3 for s in SUMMARIES}, dict.fromkeys(SUMMARIES, default), "")
                    oriented = values if default[0] == "higher" else -values
                    averages = [score_table(oriented[:, k], rows.label, rows.generator, 0, seed)[-1]["auroc"]
                                for k in range(len(SUMMARIES))]
                    best = int(np.nanargmax(averages))
                for k, summary in enumerate(SUMMARIES):
                    chosen = choice.directions[summary]
                    if fit is not None:
                        source = f"{'undetermined' if len(chosen) == 2 else 'chosen'} on {direction_from}"
                    else:
                        source = "declared" if direction else "default"
                    split = dict(zip(("split_auroc", "split_auroc_low", "split_auroc_high"), choice.auroc[summary]))
                    for oriented_as in chosen:
                        add(name, "summary", summary, values[:, k] if oriented_as == "higher" else -values[:, k],
                            chosen=k == best, summary_source=(f"chosen on {direction_from}" if fit is not None
                                                              else "best on the scored rows"),
                            direction=oriented_as, direction_source=source, **split)
                stem = rows.store.path.stem
                stem = stem if stems.count(stem) == 1 else f"{rows.store.path.parent.name}_{stem}"
                figures[f"{stem}_{name}"] = _figure(values, rows, best, [choice.directions[s][0] for s in SUMMARIES],
                                                    f"{name} · {path} · protocol {rows.protocol}")
            for name in probes[path]:
                progress.console.print(f"linear probe {name} on {path}")
                label = PROBES[len(rows.store.feature_info(name).shape)]
                add(name, "probe", label, probe_scores(rows, name, fit, seed), chosen=True,
                    summary_source="fixed", direction="probe", direction_source=probe_source,
                    split_auroc=np.nan, split_auroc_low=np.nan, split_auroc_high=np.nan)
    table = pd.DataFrame(records)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "separability.csv", index=False)
    fitted = f"fitted on {direction_from}" if fit is not None else "cross-fitted on the scored rows (2 folds)"
    if fit is not None:
        chosen_text = (f"Summary and direction of each map chosen on `{direction_from}` alone (the scored rows only "
                       f"report): the direction is undetermined, and both are scored, where that split's interval "
                       f"contains 0.5; the summary is the one farthest from 0.5 there.")
    else:
        chosen_text = (f"Direction {'declared' if direction else 'by default'}: {direction or 'higher'} = fake. The best "
                       f"summary is picked on the scored rows themselves (optimistic; all {len(SUMMARIES)} shown).")
    header = (f"# Separability of the guidance maps\n\nPer generator, AUROC and AP of each summary as the protocol "
              f"table scores a detector (reals pooled against each fake-only generator); [low, high] = 95 % "
              f"stratified bootstrap interval ({bootstrap} replicates); `average` = mean over generators. "
              f"{chosen_text} Features with many channels (CLIP): a linear probe (standardised logistic regression on "
              f"channel means, a vector as it is), {probe_source}. References: AUROC of the format-only and double-JPEG classifiers on the same rows, "
              f"{fitted}.\n")
    markdown = _markdown(table, notes, header)
    (out / "separability.md").write_text(markdown)
    writer = None
    if tb:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        writer.add_text("separability", markdown)
    for name, figure in figures.items():
        if writer is not None:
            writer.add_figure(f"separability/{name}", figure, close=False)
        save_figure(figure, out / "plots" / f"{name}.png")
    if writer is not None:
        writer.close()
    return table
