"""`dinokit embed | index | search | dedup | pca | serve`: thin commands over `dinokit.apps`."""

from __future__ import annotations

import argparse
import json

from dinokit.cli import RERUN_TO_RESUME


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed a folder, glob, file list or WebDataset shards of images into "
                                            "sharded .npy/.parquet")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="folder (recursive), quoted glob, .txt file with one path per line, .parquet of paths, "
                        "image files, or WebDataset shards: a .tar, a folder of .tar, 'shards/{00000..00099}.tar'")
    p.add_argument("--model", "-m", required=True, help="model directory, hub id, checkpoint file or preset")
    p.add_argument("--output", "-o", required=True, help="output folder (an unfinished run in it is resumed)")
    p.add_argument("--pooling", choices=["cls", "mean", "cls+mean", "patch"], default="cls",
                   help="what to store per image: the CLS token, the mean patch token, both concatenated, or the "
                        "whole patch grid")
    p.add_argument("--normalize", action="store_true", help="store unit-length vectors")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored number type (float16 halves the files)")
    p.add_argument("--image-size", type=int, default=224, help="crop size, a multiple of the patch size (14 DINOv2, 16 DINOv3)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decoding processes (default: CPU cores up to 8 for a GPU model; for a CPU model 0 "
                        "(decode between batches) on up to 4 cores, else one per 8 cores)")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard (default: 10000; patch: ~256 MB)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--int8", action="store_true",
                   help="CPU: run the blocks' linear layers in int8 (about 2x faster on AMX/VNNI CPUs; CLS cosine "
                        "~0.998 to float32)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (or torchrun's); ray: Ray Data tasks decode, a pool of model actors "
                        "embeds (needs dinokit[ray])")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join ('auto', 'ray://head:10001'); default: start a local Ray")
    p.add_argument("--workers", type=int, default=None, help="--engine ray: model actors (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="--engine ray: GPUs per model actor")
    p.set_defaults(func=_embed, on_interrupt=RERUN_TO_RESUME)

    p = subparsers.add_parser("index", help="build a faiss index over an embedding folder")
    p.add_argument("emb_dir", metavar="DIR", help="embedding folder written by `dinokit embed`")
    p.add_argument("--output", "-o", default=None, help="index folder (default DIR/index)")
    p.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                   help="auto: exact up to --exact-max vectors, IVF-Flat above")
    p.add_argument("--exact-max", type=int, default=200_000, help="largest number of vectors --kind auto indexes "
                                                                   "exactly")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 an approximate index is tuned to")
    p.set_defaults(func=_index)

    p = subparsers.add_parser("search", help="most similar indexed images to query images")
    p.add_argument("index", metavar="INDEX", help="index folder, or an embedding folder holding index/")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--model", default=None, help="override the model recorded in the index")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.set_defaults(func=_search)

    p = subparsers.add_parser("dedup", help="group near-duplicate images of an embedding folder")
    p.add_argument("emb_dir", metavar="DIR", help="embedding folder written by `dinokit embed`")
    p.add_argument("--threshold", "-t", type=float, default=0.95, help="cosine similarity at or above which images are duplicates")
    p.add_argument("--output", "-o", default=None, help="CSV file (default DIR/duplicates.csv; JSON beside it)")
    p.set_defaults(func=_dedup)

    p = subparsers.add_parser("pca", help="the DINOv2 paper's PCA picture of patch features (or attention maps)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one row of the picture each")
    p.add_argument("--output", "-o", required=True, help="PNG file to write")
    p.add_argument("--model", "-m", default="facebook/dinov2-small",
                   help="model directory, hub id or checkpoint file")
    p.add_argument("--size", type=int, default=448, help="short side in pixels, a multiple of the patch size (14 DINOv2, 16 DINOv3)")
    p.add_argument("--attention", action="store_true", help="draw last-block CLS attention per head instead")
    p.add_argument("--threshold", type=_threshold, default=0.0,
                   help="foreground if the first component scores above this; 'none' keeps all")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.set_defaults(func=_pca)

    p = subparsers.add_parser("serve", help="image-search web page and JSON API over an embedding folder")
    p.add_argument("emb_dir", metavar="EMBED_DIR", help="embedding folder written by `dinokit embed`")
    p.add_argument("--model", "-m", default=None, help="override the model recorded in the folder's manifest")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the collection)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=32, help="largest model batch; 1 turns dynamic batching off")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="server work per request, from its body's arrival to its answer; longer gets 504 and its "
                        "work is stopped (0: no limit)")
    p.add_argument("--absolute-paths", action="store_true",
                   help="show the images' absolute paths (default: relative to the collection root)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--curate", default=None, metavar="CURATE_OUT",
                   help="output folder of `dinokit curate` over this folder: adds a Clusters tab")
    p.set_defaults(func=_serve)


def _threshold(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _embed(args) -> int:
    from dinokit.apps.embed import embed

    inputs = args.inputs[0] if len(args.inputs) == 1 else args.inputs
    report = embed(inputs, args.model, args.output, pooling=args.pooling, normalize=args.normalize,
                   dtype=args.dtype, image_size=args.image_size, batch_size=args.batch_size,
                   num_workers=args.num_workers, shard_size=args.shard_size, device=args.device,
                   progress=not args.quiet, engine=args.engine, ray_address=args.ray_address,
                   workers=args.workers, gpus_per_worker=args.gpus_per_worker, int8=args.int8)
    return 0 if report.num_embedded else 1


def _index(args) -> int:
    from dinokit.apps.index import build_index

    r = build_index(args.emb_dir, args.output, kind=args.kind, exact_max=args.exact_max,
                    target_recall=args.target_recall)
    params = ", ".join(f"{k}={v}" for k, v in r.params.items())
    recall = "exact" if r.kind == "flat" else f"recall@10 {r.recall_at_10:.3f} on {r.recall_queries} queries"
    print(f"{r.kind} index of {r.num_vectors:,} x {r.dim} vectors ({params or 'inner product'}; {recall}) "
          f"-> {r.output_dir}")
    return 0


def _search(args) -> int:
    from dinokit.apps.search import search

    results = search(args.index, args.images, k=args.k, model=args.model, device=args.device)
    if args.json:
        print(json.dumps([{"query": q, "results": [vars(m) for m in matches]}
                          for q, matches in zip(args.images, results)], indent=2))
        return 0
    from dinokit.data.images import display_path

    for query, matches in zip(args.images, results):
        print(display_path(query))  # a non-UTF-8 file name cannot be printed as it is
        for m in matches:
            print(f"  {m.rank:3d}  {m.score:.4f}  {m.path}")
    return 0


def _dedup(args) -> int:
    from dinokit.apps.dedup import dedup

    r = dedup(args.emb_dir, threshold=args.threshold, output=args.output)
    print(f"{r.num_images:,} images: {len(r.groups):,} near-duplicate groups, {r.num_duplicates:,} images to "
          f"remove (threshold {r.threshold}) -> {r.csv_path}, {r.json_path}")
    return 0


def _pca(args) -> int:
    from dinokit.apps.pca import pca_picture

    picture = pca_picture(args.images, args.output, model=args.model, size=args.size, attention=args.attention,
                          threshold=args.threshold, device=args.device)
    print(f"wrote {picture.path} ({picture.image.width}x{picture.image.height}, {len(picture.boxes)} rows)")
    return 0


def _serve(args) -> int:
    from dinokit.apps.serve import serve

    serve(args.emb_dir, model=args.model, host=args.host, port=args.port, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb, device=args.device,
          request_timeout=args.request_timeout, absolute_paths=args.absolute_paths, curate=args.curate)
    return 0
