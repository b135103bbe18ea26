"""`dinokit curate`: the command over `dinokit.curate.pipeline.curate`."""

from __future__ import annotations

import argparse

from dinokit.cli import RERUN_TO_RESUME


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    from dinokit.curate.pipeline import STAGES, CurateOptions

    d = CurateOptions()
    p = subparsers.add_parser(
        "curate", help="dedup, decontaminate, cluster (hierarchical k-means) and balance-sample an embedding pool")
    p.add_argument("pool", metavar="POOL_EMB", help="embedding folder (`dinokit embed`, clip-retrieval) or an (N, D) "
                                                    ".npy whose rows are named by index")
    p.add_argument("--output", "-o", required=True, help="output folder (an unfinished run in it is resumed)")
    p.add_argument("--seed", action="append", default=[], metavar="NAME=SEED_EMB",
                   help="curated seed set to retrieve pool images for (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME=EVAL_EMB",
                   help="evaluation set: every pool component touching one of its images is dropped (repeatable)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target", type=int, default=None, help="images to select by balanced sampling")
    budget.add_argument("--fraction", type=float, default=None, help="share of the deduplicated pool to select")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} (default: those "
                                                  "the other options call for)")
    p.add_argument("--dedup-threshold", type=float, default=d.dedup_threshold,
                   help="cosine similarity at or above which k-NN neighbours are duplicates (calibrate with "
                        "OUT/nn_similarity.png)")
    p.add_argument("--exclude-threshold", type=float, default=d.exclude_threshold,
                   help="cosine similarity linking pool and evaluation images")
    p.add_argument("--knn", type=int, default=d.k, help="neighbours per image in the dedup graph")
    p.add_argument("--exact-max", type=int, default=d.exact_max, help="largest set searched exactly (IVF above)")
    p.add_argument("--levels", type=_ints, default=None,
                   help="clusters per level, lowest first, e.g. 20000,2000,200 (default: ~64 images per leaf "
                        "cluster, ~10 children per cluster, at most 4 levels)")
    p.add_argument("--iters", type=int, default=d.n_iters, help="Lloyd iterations per k-means")
    p.add_argument("--resample-steps", type=_ints, default=[d.resample_steps],
                   help="resampling steps, one number for every level or one per level")
    p.add_argument("--sample-sizes", type=_ints, default=None,
                   help="points per cluster kept by each resampling step, one per level (default: half the mean "
                        "cluster size)")
    p.add_argument("--splits", type=int, default=d.n_splits, help="split every first-level cluster in this many")
    p.add_argument("--precision", choices=["float32", "float64"], default=d.precision,
                   help="k-means assignment arithmetic (centroid sums are always float64)")
    p.add_argument("--memory-mb", type=int, default=d.memory_mb,
                   help="k-means inputs up to this size are read into memory; larger ones are streamed from the "
                        "memory-mapped shards on every pass (the pool itself is never loaded whole)")
    p.add_argument("--engine", choices=["local", "ray"], default=d.engine,
                   help="run the k-NN searches and k-means assignments in this process or as Ray tasks (equal "
                        "results; workers read the shards themselves, so a cluster needs them on shared storage)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--device", default=d.device,
                   help="k-means assignments: auto (a CUDA GPU when torch sees one, for float32 on the local engine; "
                        "else cpu), cpu (faiss) or cuda[:N] (torch)")
    p.add_argument("--multiplier", type=int, default=d.multiplier, help="most times one image may be selected")
    p.add_argument("--leaf", choices=["random", "closest"], default=d.leaf, help="which images a capped leaf "
                                                                                 "cluster gives")
    p.add_argument("--retrieval", choices=["auto", "sample", "cluster"], default=d.retrieval,
                   help="sample: --per-seed nearest images per seed image; cluster: --per-cluster images from "
                        "every cluster with more than --min-seed-hits seed images; auto: sample above 1M seeds")
    p.add_argument("--per-seed", type=int, default=d.per_seed, help="sample-based: pool images per seed image")
    p.add_argument("--min-seed-hits", type=int, default=d.min_seed_hits,
                   help="cluster-based: a cluster qualifies with more than this many seed images")
    p.add_argument("--per-cluster", type=int, default=d.per_cluster, help="cluster-based: images per cluster")
    p.add_argument("--cap", type=int, default=d.cap, help="cluster-based: most images per seed set")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave NaN, infinite and zero vectors out (listed in OUT/invalid.csv) instead of refusing "
                        "the set")
    p.add_argument("--random-seed", type=int, default=d.random_seed, help="seed of every random choice")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_curate, on_interrupt=RERUN_TO_RESUME)


def _curate(args) -> int:
    from dinokit.curate.inputs import parse_named
    from dinokit.curate.pipeline import CurateOptions, curate

    steps = args.resample_steps[0] if len(args.resample_steps) == 1 else args.resample_steps
    options = CurateOptions(
        target=args.target, fraction=args.fraction,
        stages=tuple(s.strip() for s in args.stages.split(",")) if args.stages else None,
        dedup_threshold=args.dedup_threshold, exclude_threshold=args.exclude_threshold, k=args.knn,
        exact_max=args.exact_max, levels=args.levels, n_iters=args.iters, resample_steps=steps,
        sample_sizes=args.sample_sizes, n_splits=args.splits, precision=args.precision, device=args.device,
        multiplier=args.multiplier, leaf=args.leaf, retrieval=args.retrieval, per_seed=args.per_seed,
        min_seed_hits=args.min_seed_hits, per_cluster=args.per_cluster, cap=args.cap,
        random_seed=args.random_seed, memory_mb=args.memory_mb, engine=args.engine, ray_address=args.ray_address,
        skip_invalid=args.skip_invalid)
    report = curate(args.pool, args.output, seeds=[parse_named(s, "--seed") for s in args.seed],
                    excludes=[parse_named(s, "--exclude") for s in args.exclude], options=options, quiet=args.quiet)
    c = report.counts
    stages = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in c.items()
                       if not k.startswith("retrieved:"))
    print(f"{stages} -> {report.output}/selected.txt, selected.parquet, report.html")
    for key, info in c.items():
        if key.startswith("retrieved:"):
            print(f"  {key}: {info['mode']}-based, {info['distinct']:,} images ({info['nominal']:,} nominal, "
                  f"{info['collisions']:,} collisions)")
    return 0
