"""`dinokit curate`: the stages in order, each resumable and each writing its result atomically.

    OUT/dedup/       keep.npy, component.npy, nearest.npy (over pool rows), groups.csv, nn_similarity.{json,png}
    OUT/decontam/    keep.npy (over pool rows), removed.csv
    OUT/clusters/    rows.npy (pool rows clustered), level{l}.npy (parent of each level input row),
                     centroids_level{l}.npy, sqdist_level{l}.npy, level{l}.json (written last: the level is done)
    OUT/sampling/    rows.npy, times.npy (pool rows picked by balanced sampling)
    OUT/retrieval/   {name}_rows.npy, {name}_times.npy, {name}.json
    OUT/.stages/     {stage}.json: the fingerprint of the stage's parameters and inputs, written after its files
    OUT/selected.parquet, selected.txt, report.html (+ PNGs), manifest.json (written last, `complete`)

A rerun skips every stage whose fingerprint (its parameters plus the fingerprints of the stages before it)
matches what is recorded, and redoes the rest; a kill leaves at worst one stage or k-means level to redo.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from dinokit import __version__, atomic, locking
from dinokit.curate import dedup as dedup_stage
from dinokit.curate import engine as engines
from dinokit.curate import hierarchy, inputs, kmeans, knn, retrieval, sampling
from dinokit.curate.hierarchy import Level
from dinokit.curate.progress import bars

STAGES = ("dedup", "decontam", "kmeans", "sample", "retrieve")
DEFAULT_EXCLUDE_THRESHOLD = 0.90  # stricter (lower) than self-dedup's, as DINOv2's 0.45 vs 0.6


@dataclass
class CurateOptions:
    target: int | None = None
    fraction: float | None = None
    stages: tuple[str, ...] | None = None  # None: every stage the other options call for
    dedup_threshold: float = dedup_stage.DEFAULT_THRESHOLD
    exclude_threshold: float = DEFAULT_EXCLUDE_THRESHOLD
    k: int = knn.DEFAULT_K
    exact_max: int = knn.EXACT_MAX
    levels: list[int] | None = None  # cluster counts, level 1 first; None: hierarchy.default_levels(N)
    n_iters: int = 50
    resample_steps: list[int] | int = hierarchy.DEFAULT_RESAMPLE_STEPS
    sample_sizes: list[int] | None = None  # None: half the mean cluster size per level
    n_splits: int = 1
    precision: str = "float32"
    device: str = "auto"  # k-means assignments: a CUDA GPU when torch sees one (kmeans.resolve_device), else faiss
    multiplier: int = 1
    leaf: str = "random"
    retrieval: str = "auto"
    per_seed: int = 4
    min_seed_hits: int = 3
    per_cluster: int = 10_000
    cap: int = 1_000_000
    random_seed: int = 0
    memory_mb: int = hierarchy.MEMORY_BUDGET >> 20  # larger k-means inputs are streamed from the shards
    engine: str = "local"  # where k-NN search and k-means assignment batches run: "local" or "ray"
    ray_address: str | None = None  # None: a local Ray (or the one already initialised)
    skip_invalid: bool = False  # leave NaN/infinite/zero rows out (OUT/invalid.csv) instead of refusing the set


@dataclass
class CurateReport:
    output: str
    counts: dict = field(default_factory=dict)
    stages_run: list[str] = field(default_factory=list)
    stages_reused: list[str] = field(default_factory=list)
    num_selected: int = 0


def _log_to(quiet: bool):
    start = time.monotonic()

    def log(message: str) -> None:
        if not quiet:
            print(f"[curate {time.monotonic() - start:7.1f}s] {message}", file=sys.stderr, flush=True)
    return log


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
    atomic.atomic_write(path, write)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint_vectors(vectors: np.ndarray) -> str:
    step = max(1, len(vectors) // 1024)
    return hashlib.sha256(vectors[::step].tobytes() + str(vectors.shape).encode()).hexdigest()[:16]


class Stages:
    """Records which stage results in OUT are current: `.stages/{name}.json` holds their fingerprint."""

    def __init__(self, out: Path):
        self.folder = out / ".stages"

    def done(self, name: str, fingerprint: str) -> dict | None:
        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return record if record.get("fingerprint") == fingerprint else None

    def mark(self, name: str, fingerprint: str, summary: dict) -> None:
        text = json.dumps({"fingerprint": fingerprint, "summary": summary}, indent=2) + "\n"
        atomic.write_text(self.folder / f"{name}.json", text)


def plan_stages(options: CurateOptions, has_seeds: bool, has_excludes: bool) -> tuple[str, ...]:
    wants_sample = options.target is not None or options.fraction is not None
    if options.stages is None:
        chosen = ["dedup"] + (["decontam"] if has_excludes else []) + ["kmeans"]
        chosen += (["sample"] if wants_sample else []) + (["retrieve"] if has_seeds else [])
        return tuple(chosen)
    unknown = set(options.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    chosen = tuple(s for s in STAGES if s in options.stages)
    if "sample" in chosen and not wants_sample:
        raise ValueError("the sample stage needs a budget: give --target N or --fraction F")
    if "decontam" in chosen and not has_excludes:
        raise ValueError("the decontam stage needs evaluation embeddings: give --exclude NAME=EMB")
    if "retrieve" in chosen and not has_seeds:
        raise ValueError("the retrieve stage needs seed embeddings: give --seed NAME=EMB")
    needs_clusters = "sample" in chosen or ("retrieve" in chosen and options.retrieval != "sample")
    if needs_clusters and "kmeans" not in chosen:
        raise ValueError("balanced sampling and cluster-based retrieval need the kmeans stage: add it to --stages")
    return chosen


def check_options(o: CurateOptions, seeds, excludes) -> None:
    """Every option a run cannot use, refused before anything is read or written."""
    if o.target is not None and o.fraction is not None:
        raise ValueError("give --target or --fraction, not both")
    if o.multiplier < 1:
        raise ValueError(f"--multiplier is the most times one image may be selected, at least 1; got {o.multiplier}")
    if o.fraction is not None and not 0 < o.fraction <= o.multiplier:
        raise ValueError(f"--fraction must be in (0, multiplier={o.multiplier}], got {o.fraction}")
    if o.target is not None and o.target < 1:
        raise ValueError(f"--target must be a positive number of images, got {o.target}")
    for value, what in ((o.dedup_threshold, "--dedup-threshold"), (o.exclude_threshold, "--exclude-threshold")):
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"{what} is a cosine similarity in [-1, 1], got {value}")
    if o.levels is not None and (not o.levels or min(o.levels) < 1):
        raise ValueError(f"--levels takes positive cluster counts, lowest level first, e.g. 2000,200; got {o.levels}")
    steps = o.resample_steps if isinstance(o.resample_steps, list) else [o.resample_steps]
    for values, what in (([o.k], "--knn"), ([o.per_seed], "--per-seed"), ([o.per_cluster], "--per-cluster"),
                         ([o.cap], "--cap"), ([o.n_splits], "--splits"), ([o.memory_mb], "--memory-mb"),
                         (o.sample_sizes or [1], "--sample-sizes")):
        if min(values) < 1:
            raise ValueError(f"{what} must be at least 1, got {values if len(values) > 1 else values[0]}")
    for values, what in (([o.n_iters], "--iters"), (steps, "--resample-steps"), ([o.min_seed_hits],
                                                                                  "--min-seed-hits")):
        if min(values) < 0:
            raise ValueError(f"{what} cannot be negative, got {values if len(values) > 1 else values[0]}")
    if o.engine not in engines.ENGINES:
        raise ValueError(f"--engine is one of {', '.join(engines.ENGINES)}, got {o.engine!r}")
    kmeans.resolve_device(o.device, o.precision, o.engine)  # an unknown or absent device, before anything is written
    if o.engine == "ray":  # before any output exists
        from dinokit.extras import optional_import

        optional_import("ray", purpose="dinokit curate --engine ray")
    for named, option in ((seeds, "--seed"), (excludes, "--exclude")):
        names = [name for name, _ in named]
        if len(set(names)) != len(names):
            raise ValueError(f"two {option} sets have the same NAME; name them NAME=PATH")


def curate(pool_path: str | Path, output: str | Path, *, seeds: list[tuple[str, str]] = (),
           excludes: list[tuple[str, str]] = (), options: CurateOptions | None = None,
           quiet: bool = False) -> CurateReport:
    options = options or CurateOptions()
    out = Path(output)
    log = _log_to(quiet)
    progress = bars(not quiet)
    check_options(options, seeds, excludes)
    stages = plan_stages(options, bool(seeds), bool(excludes))
    options = replace(options, device=kmeans.resolve_device(options.device, options.precision, options.engine))
    if options.device != "cpu":
        log(f"k-means assignments on {options.device} (torch)")

    skip = options.skip_invalid
    pool = inputs.load_set(pool_path, "pool", progress, skip)
    if pool.invalid and len(pool.invalid) == len(pool):
        raise ValueError(f"every vector of the pool ({pool.source}) is NaN, infinite or zero: nothing to curate; "
                         f"re-embed the images.")
    seed_sets = [inputs.load_set(path, name, progress, skip) for name, path in seeds]
    exclude_sets = [inputs.load_set(path, name, progress, skip) for name, path in excludes]
    for s in [pool, *seed_sets, *exclude_sets]:
        if s.invalid:
            log(f"--skip-invalid: {len(s.invalid):,} NaN, infinite or zero vector(s) of {s.name} left out"
                + (" (listed in OUT/invalid.csv)" if s is pool else ""))
    seed_sets = [inputs.without_invalid(s) for s in seed_sets]
    exclude_sets = [inputs.without_invalid(s) for s in exclude_sets]
    inputs.check_compatible(pool, seed_sets + exclude_sets, log)
    log(f"pool {pool.source}: {len(pool):,} x {pool.dim}; stages: {', '.join(stages)}")

    with locking.acquire(out, "dinokit curate"), _engine(options, log) as engine:
        atomic.remove_stale_temporaries(out, recursive=True)
        (out / "manifest.json").unlink(missing_ok=True)  # a finished-looking folder only once everything is
        run = _Run(out, pool, options, log, progress, engine)
        run.write_invalid()
        keep = run.dedup(stages)
        keep = run.decontaminate(stages, keep, exclude_sets)
        survivors = np.flatnonzero(keep)
        if len(survivors) == 0:  # decontamination can drop every image; an empty selection is not a result
            raise ValueError(f"no pool image is left after decontamination at --exclude-threshold "
                             f"{options.exclude_threshold}: see {out / 'decontam' / 'removed.csv'} and raise it")
        run.check_budget(stages, survivors)  # before k-means: a budget the pool cannot meet fails at once
        levels = run.kmeans(stages, survivors)
        balanced = run.sample(stages, survivors, levels)
        retrieved = run.retrieve(stages, survivors, levels, seed_sets)
        selection = _write_selection(out, pool, survivors, levels, balanced, retrieved)
        run.counts["selected_images"] = int(len(selection["rows"]))
        run.counts["selected_with_repeats"] = int(selection["times"].sum())
        from dinokit.curate.report import write_report

        write_report(out, pool, run.counts, levels, survivors, selection, options)
        manifest = {
            "complete": True, "dinokit_version": __version__, "versions": _versions(options), "pool": pool.source,
            "pool_manifest_model": (pool.manifest.get("model") or {}).get("spec"),
            "num_pool": len(pool), "dim": pool.dim,
            "pool_names_sha256": hashlib.sha256("\n".join(pool.names()).encode()).hexdigest(),  # `serve --curate`
            "stages": list(stages), "options": asdict(options),
            "seeds": {s.name: {"source": s.source, "images": len(s)} for s in seed_sets},
            "excludes": {s.name: {"source": s.source, "images": len(s)} for s in exclude_sets},
            "keep_rule": dedup_stage.KEEP_RULE, "counts": run.counts,
            "levels": [lv.k for lv in levels] if levels else [],
        }
        atomic.write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
    log(f"done: {run.counts.get('selected_images', 0):,} images selected -> {out}")
    return CurateReport(str(out), run.counts, run.ran, run.reused, run.counts.get("selected_images", 0))


def _versions(options: CurateOptions) -> dict:
    """The libraries whose arithmetic or file formats the outputs depend on (torch and ray when they ran)."""
    import platform

    import faiss
    import pyarrow

    versions = {"dinokit": __version__, "python": platform.python_version(), "numpy": np.__version__,
                "faiss": getattr(faiss, "__version__", "unknown"), "pyarrow": pyarrow.__version__}
    if options.device != "cpu":
        import torch

        versions["torch"] = torch.__version__
    if options.engine == "ray":
        import ray

        versions["ray"] = ray.__version__
    return versions


@contextlib.contextmanager
def _engine(options: CurateOptions, log):
    engine = engines.make_engine(options.engine, options.ray_address)
    if options.engine != "local":
        log(f"engine: {options.engine} ({options.ray_address or 'local Ray'}) for k-NN search and assignments")
    try:
        yield engine
    finally:
        if options.engine != "local":
            log(f"engine: {engine.tasks_run:,} Ray tasks run")
        engine.close()


class _Run:
    def __init__(self, out: Path, pool: inputs.EmbeddingSet, options: CurateOptions, log, progress, engine):
        self.out, self.pool, self.options, self.log, self.progress = out, pool, options, log, progress
        self.engine = engine  # not in any fingerprint: both engines give equal results
        self.stages = Stages(out)
        self.valid = pool.valid
        self.fingerprint = _hash("pool", _fingerprint_vectors(pool.vectors), options.random_seed,
                                 [r for r, _ in pool.invalid])
        self.counts = {"pool": len(pool)}
        if pool.invalid:
            self.counts["invalid_skipped"] = len(pool.invalid)
        self.ran, self.reused = [], []

    def _step(self, name: str, params) -> tuple[str, dict | None]:
        self.fingerprint = _hash(name, params, self.fingerprint)
        record = self.stages.done(name, self.fingerprint)
        (self.reused if record else self.ran).append(name)
        if record:
            self.log(f"{name}: done earlier, reusing its results")
        return self.fingerprint, record

    def write_invalid(self) -> None:
        """OUT/invalid.csv: the pool rows --skip-invalid left out, with why (absent when there are none)."""
        path = self.out / "invalid.csv"
        if not self.pool.invalid:
            path.unlink(missing_ok=True)
            return
        names = self.pool.names()

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["row", "path", "reason"])
                writer.writerows([r, names[r], why] for r, why in self.pool.invalid)
        atomic.atomic_write(path, write)

    # ------------------------------------------------------------------------------ dedup
    def _self_dedup(self) -> dedup_stage.DedupResult:
        """Self-dedup over the valid rows, as full-length arrays (a left-out row: its own component, not kept)."""
        o = self.options
        rows = np.flatnonzero(self.valid)
        every = len(rows) == len(self.pool)
        vectors, names, pixels = self.pool.vectors, self.pool.paths, self.pool.pixels
        if not every:
            vectors = vectors.subset(rows)
            names = None if names is None else [names[r] for r in rows]
            pixels = None if pixels is None else pixels[rows]
        result = dedup_stage.self_dedup(vectors, o.dedup_threshold, k=o.k, names=names, pixels=pixels,
                                        exact_max=o.exact_max, progress=self.progress, engine=self.engine)
        if every:
            return result
        n = len(self.pool)
        keep, component, nearest = np.zeros(n, bool), np.arange(n, dtype=np.int64), np.full(n, -1, np.float32)
        keep[rows], component[rows], nearest[rows] = result.keep, rows[result.component], result.nearest
        return dedup_stage.DedupResult(keep, component, nearest, result.num_edges)

    def dedup(self, stages) -> np.ndarray:
        o = self.options
        if "dedup" not in stages:
            return self.valid.copy()
        fp, record = self._step("dedup", [o.dedup_threshold, o.k, o.exact_max])
        folder = self.out / "dedup"
        if record is None:
            self.log(f"dedup: {o.k}-NN graph of {len(self.pool):,} images, threshold {o.dedup_threshold}")
            result = self._self_dedup()
            _write_groups(folder / "groups.csv", self.pool, result)
            counts, edges = knn.nn_histogram(result.nearest[self.valid])
            histogram = {"bin_edges": edges.round(4).tolist(), "counts": counts.tolist(),
                         "threshold": o.dedup_threshold, "kind": "cosine similarity to the nearest other image",
                         "quantiles": {str(q): float(np.quantile(result.nearest[self.valid], q)) for q in
                                       (0.01, 0.1, 0.5, 0.9, 0.99, 0.999)}}
            atomic.write_text(folder / "nn_similarity.json", json.dumps(histogram, indent=1) + "\n")
            save_npy(folder / "component.npy", result.component)
            save_npy(folder / "nearest.npy", result.nearest)
            save_npy(folder / "keep.npy", result.keep)
            self.stages.mark("dedup", fp, {"kept": int(result.keep.sum()), "edges": result.num_edges})
        keep = np.load(folder / "keep.npy")
        self.counts["after_dedup"] = int(keep.sum())
        self.log(f"dedup: {int(keep.sum()):,} of {len(keep):,} kept")
        return keep

    # ------------------------------------------------------------------------------ decontamination
    def decontaminate(self, stages, keep: np.ndarray, references: list[inputs.EmbeddingSet]) -> np.ndarray:
        o = self.options
        if "decontam" not in stages:
            return keep
        fp, record = self._step("decontam", [o.exclude_threshold, o.k, [(r.name, _fingerprint_vectors(r.vectors))
                                                                        for r in references]])
        folder = self.out / "decontam"
        if record is None:
            rows = np.flatnonzero(keep)
            reference = inputs.concatenate([r.vectors for r in references])
            owners = np.concatenate([[i] * len(r) for i, r in enumerate(references)]).astype(int)
            ref_names = [f"{r.name}:{n}" for r in references for n in r.names()]
            self.log(f"decontam: {len(rows):,} pool images against {len(reference):,} evaluation images, "
                      f"threshold {o.exclude_threshold}")
            result = dedup_stage.decontaminate(self.pool.vectors.subset(rows), reference, o.exclude_threshold,
                                               k=o.k, exact_max=o.exact_max, progress=self.progress,
                                               engine=self.engine)
            names = self.pool.names()
            removed = [[int(rows[i]), names[rows[i]], references[owners[result.nearest_reference[i]]].name,
                        ref_names[result.nearest_reference[i]], round(float(result.similarity[i]), 6)]
                       for i in np.flatnonzero(result.drop)]

            def write(tmp: Path) -> None:
                with open(tmp, "w", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(["row", "path", "exclude_set", "nearest_reference", "similarity"])
                    writer.writerows(removed)
            atomic.atomic_write(folder / "removed.csv", write)
            new_keep = keep.copy()
            new_keep[rows[result.drop]] = False
            save_npy(folder / "keep.npy", new_keep)
            self.stages.mark("decontam", fp, {"removed": len(removed)})
        new_keep = np.load(folder / "keep.npy")
        self.counts["after_decontam"] = int(new_keep.sum())
        self.log(f"decontam: {int(keep.sum() - new_keep.sum()):,} removed")
        return new_keep

    # ------------------------------------------------------------------------------ hierarchical k-means
    def kmeans(self, stages, survivors: np.ndarray) -> list[Level] | None:
        o = self.options
        if "kmeans" not in stages:
            return None
        ks = list(o.levels) if o.levels else hierarchy.default_levels(len(survivors))
        steps = o.resample_steps if isinstance(o.resample_steps, list) else [o.resample_steps] * len(ks)
        if len(steps) != len(ks) or (o.sample_sizes is not None and len(o.sample_sizes) != len(ks)):
            raise ValueError(f"{len(ks)} levels ({ks}) but {len(steps)} resampling step counts"
                             + (f" and {len(o.sample_sizes)} sample sizes" if o.sample_sizes else ""))
        if o.n_splits > 1:
            steps[0] = 0  # a split first level is not resampled (as in the reference)
        fp, record = self._step("kmeans", [ks, steps, o.sample_sizes, o.n_iters, o.n_splits, o.precision])
        folder = self.out / "clusters"
        if record is None:
            save_npy(folder / "rows.npy", survivors)
            level_input = self.pool.vectors.subset(survivors)  # read (or streamed) by cluster_level
            for i, k in enumerate(ks):
                number = i + 1
                level_fp = _hash(fp, number)
                info = folder / f"level{number}.json"
                if info.is_file() and json.loads(info.read_text()).get("fingerprint") == level_fp:
                    self.log(f"kmeans level {number}: done earlier")
                else:
                    size = o.sample_sizes[i] if o.sample_sizes else None
                    self.log(f"kmeans level {number}: {len(level_input):,} inputs -> {k:,} clusters, "
                             f"{steps[i]} resampling steps")
                    level = hierarchy.cluster_level(
                        level_input, k, n_iters=o.n_iters, resample_steps=steps[i], sample_size=size,
                        n_splits=o.n_splits if number == 1 else 1, precision=o.precision, device=o.device,
                        rng=np.random.default_rng([o.random_seed, number]), log=self.log, progress=self.progress,
                        memory_budget=o.memory_mb << 20, engine=self.engine)
                    save_npy(folder / f"level{number}.npy", level.labels.astype(np.int32))
                    save_npy(folder / f"centroids_level{number}.npy", level.centroids)
                    save_npy(folder / f"sqdist_level{number}.npy", level.sqdist)
                    atomic.write_text(info, json.dumps({"fingerprint": level_fp, "k": level.k,
                                                        "inputs": len(level.labels)}) + "\n")
                level_input = np.load(folder / f"centroids_level{number}.npy")
            self.stages.mark("kmeans", fp, {"levels": len(ks)})
        levels = self.load_levels(len(ks))
        self.counts["clusters_per_level"] = [lv.k for lv in levels]
        return levels

    def load_levels(self, n: int) -> list[Level]:
        folder = self.out / "clusters"
        return [Level(np.load(folder / f"level{i}.npy").astype(np.int64), np.load(folder / f"centroids_level{i}.npy"),
                      np.load(folder / f"sqdist_level{i}.npy")) for i in range(1, n + 1)]

    # ------------------------------------------------------------------------------ balanced sampling
    def check_budget(self, stages, survivors: np.ndarray) -> int | None:
        o = self.options
        if "sample" not in stages:
            return None
        target = o.target if o.target is not None else max(1, int(round(o.fraction * len(survivors))))
        if target > len(survivors) * o.multiplier:
            raise ValueError(f"--target {target:,} is more than the {len(survivors):,} images left after dedup and "
                             f"decontamination x --multiplier {o.multiplier}; lower --target or raise --multiplier.")
        return target

    def sample(self, stages, survivors: np.ndarray, levels) -> tuple[np.ndarray, np.ndarray] | None:
        o = self.options
        if "sample" not in stages:
            return None
        target = self.check_budget(stages, survivors)
        fp, record = self._step("sample", [target, o.multiplier, o.leaf])
        folder = self.out / "sampling"
        if record is None:
            self.log(f"sample: {target:,} images over {len(levels)} levels ({o.leaf} at the leaves)")
            rows, times = sampling.sample(levels, target, multiplier=o.multiplier, leaf=o.leaf,
                                          rng=np.random.default_rng([o.random_seed, 99]))
            save_npy(folder / "rows.npy", survivors[rows])
            save_npy(folder / "times.npy", times)
            self.stages.mark("sample", fp, {"target": target, "distinct": len(rows)})
        rows, times = np.load(folder / "rows.npy"), np.load(folder / "times.npy")
        self.counts["target"] = target
        self.counts["balanced_distinct"] = len(rows)
        return rows, times

    # ------------------------------------------------------------------------------ retrieval
    def retrieve(self, stages, survivors: np.ndarray, levels, seed_sets) -> list[retrieval.Retrieved]:
        o = self.options
        if "retrieve" not in stages:
            return []
        params = [o.retrieval, o.per_seed, o.min_seed_hits, o.per_cluster, o.cap,
                  [(s.name, _fingerprint_vectors(s.vectors)) for s in seed_sets]]
        fp, record = self._step("retrieve", params)
        folder = self.out / "retrieval"
        if record is None:
            pool_vectors = self.pool.vectors.subset(survivors)
            for number, seed in enumerate(seed_sets):
                mode = retrieval.choose_mode(o.retrieval, len(seed))
                self.log(f"retrieve {seed.name}: {mode}-based from {len(seed):,} seed images")
                if mode == "sample":
                    got = retrieval.sample_based(pool_vectors, seed.vectors, o.per_seed, seed.name, o.exact_max,
                                                 progress=self.progress, engine=self.engine)
                else:
                    got = retrieval.cluster_based(levels[0].labels, levels[0].centroids, seed.vectors,
                                                  min_seed_hits=o.min_seed_hits, per_cluster=o.per_cluster,
                                                  cap=o.cap, name=seed.name, device=o.device,
                                                  rng=np.random.default_rng([o.random_seed, 7, number]))
                save_npy(folder / f"{seed.name}_rows.npy", survivors[got.rows])
                save_npy(folder / f"{seed.name}_times.npy", got.times)
                info = {"mode": got.mode, "nominal": got.nominal, "distinct": len(got.rows),
                        "collisions": got.collisions, "clusters": got.clusters, "seed_images": len(seed)}
                atomic.write_text(folder / f"{seed.name}.json", json.dumps(info) + "\n")
            self.stages.mark("retrieve", fp, {"sets": [s.name for s in seed_sets]})
        results = []
        for seed in seed_sets:
            info = json.loads((folder / f"{seed.name}.json").read_text())
            results.append(retrieval.Retrieved(seed.name, info["mode"], np.load(folder / f"{seed.name}_rows.npy"),
                                               np.load(folder / f"{seed.name}_times.npy"), info["nominal"],
                                               info["clusters"]))
            self.counts[f"retrieved:{seed.name}"] = info
        return results


def _write_groups(path: Path, pool: inputs.EmbeddingSet, result: dedup_stage.DedupResult) -> None:
    """Rows of every component with 2+ members: component, row, path, keep, similarity to the kept one."""
    sizes = np.bincount(result.component, minlength=len(result.component))
    rows = np.flatnonzero(sizes[result.component] >= 2)
    rows = rows[np.lexsort((rows, result.component[rows]))]
    kept = np.zeros(len(result.component), dtype=np.int64)
    kept[result.component[result.keep]] = np.flatnonzero(result.keep)
    names = pool.names()
    keepers = kept[result.component[rows]]
    similarity = np.empty(len(rows), dtype=np.float32)
    for s in range(0, len(rows), 65_536):  # read in batches: the pool stays on disk
        similarity[s:s + 65_536] = np.einsum("ij,ij->i", pool.vectors[rows[s:s + 65_536]],
                                             pool.vectors[keepers[s:s + 65_536]])

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["component", "row", "path", "keep", "similarity"])
            for r, sim in zip(rows.tolist(), similarity.tolist()):
                writer.writerow([int(result.component[r]), r, names[r], int(result.keep[r]), round(sim, 6)])
    atomic.atomic_write(path, write)


def _write_selection(out: Path, pool: inputs.EmbeddingSet, survivors: np.ndarray, levels, balanced,
                     retrieved: list[retrieval.Retrieved]) -> dict:
    """selected.parquet and selected.txt; returns {row: (times, sources)} as arrays for the report."""
    from dinokit.extras import optional_import

    pa = optional_import("pyarrow", purpose="curation outputs")
    pq = optional_import("pyarrow.parquet", purpose="curation outputs")
    n = len(pool)
    times = np.zeros(n, dtype=np.int64)
    sources: dict[int, list[str]] = {}
    parts = []
    if balanced is not None:
        parts.append(("balanced", *balanced))
    parts += [(f"retrieved:{r.name}", r.rows, r.times) for r in retrieved]
    if not parts:  # only dedup / decontam / kmeans ran: the selection is every survivor
        parts.append(("kept", survivors, np.ones(len(survivors), dtype=np.int64)))
    for name, rows, counts in parts:
        np.add.at(times, rows, counts)
        for r in rows.tolist():
            sources.setdefault(r, []).append(name)
    rows = np.flatnonzero(times)
    paths = point_cluster_paths = None
    if levels:
        position = np.full(n, -1, dtype=np.int64)
        position[survivors] = np.arange(len(survivors))
        paths_by_level = hierarchy.point_paths(levels)  # (survivors, L)
        point_cluster_paths = ["/".join(map(str, paths_by_level[position[r]][::-1])) if position[r] >= 0 else ""
                               for r in rows]
    names = pool.names()
    paths = [names[r] for r in rows] if pool.paths is not None else [None] * len(rows)
    keys = [pool.keys[r] for r in rows] if pool.keys is not None else [str(r) for r in rows]
    table = pa.table({"row": pa.array(rows, pa.int64()), "path": pa.array(paths, pa.string()),
                      "key": pa.array(keys, pa.string()),
                      "source": pa.array(["+".join(sources[r]) for r in rows.tolist()], pa.string()),
                      "cluster_path": pa.array(point_cluster_paths or [""] * len(rows), pa.string()),
                      "times_selected": pa.array(times[rows], pa.int64())})
    atomic.atomic_write(out / "selected.parquet", lambda tmp: pq.write_table(table, tmp))
    lines = [names[r] for r in rows]
    atomic.write_text(out / "selected.txt", "".join(line + "\n" for line in lines))
    return {"rows": rows, "times": times[rows]}
