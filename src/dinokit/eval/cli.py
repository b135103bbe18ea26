"""`dinokit eval knn|linear|logreg`, `dinokit finetune` and `dinokit classify`: thin wrappers over the Python API.
(`dinokit eval davis|correspondence` score zeroshot outputs; `dinokit.zeroshot.cli_eval` adds them here.)"""

from __future__ import annotations

import argparse
import json
import sys

from dinokit.cli import RERUN_TO_RESUME


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory, hub id, Meta/timm checkpoint file, or preset (e.g. vits14, dinov3_vits16 = random)")
    parser.add_argument("--train", required=True, help="training set: ImageFolder directory or '<path> <class>' list")
    parser.add_argument("--val", required=True, help="validation set, same classes as --train")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--cache-dir", default="default",
                        help="feature cache folder (default: $DINOKIT_CACHE/features or ~/.cache/dinokit/features)")
    parser.add_argument("--no-cache", action="store_true", help="recompute features, do not read or write the cache")
    parser.add_argument("--resize", type=int, default=256, help="eval transform: short side")
    parser.add_argument("--crop", type=int, default=224, help="eval transform: centre crop")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate frozen features (k-NN, linear probe, logistic "
                                                  "regression) and training-free outputs (DAVIS J&F, PCK)")
    protocols = evaluate.add_subparsers(dest="protocol", required=True)

    knn = protocols.add_parser("knn", help="weighted k-NN on L2-normalised final-norm CLS (T=0.07)")
    _add_common(knn)
    knn.add_argument("--output", help="write the report as JSON here")
    knn.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200], help="values of k")
    knn.add_argument("--temperature", type=float, default=0.07, help="softmax temperature of the neighbour votes")
    knn.add_argument("--n-per-class", type=int, nargs="+", help="few-shot: training images per class")
    knn.add_argument("--n-tries", type=int, default=1, help="few-shot: random subsets per value (mean ± std)")
    knn.set_defaults(func=_eval_command, on_interrupt=_features_resume_hint)

    linear = protocols.add_parser("linear", help="grid of linear heads, best on validation")
    _add_common(linear)
    linear.add_argument("--output", help="write the report as JSON here")
    linear.add_argument("--mode", choices=["fast", "reference"], default="fast",
                        help="fast: cached features, no augmentation (default); reference: RandomResizedCrop + flip "
                             "through the frozen backbone every step (slow without a GPU)")
    linear.add_argument("--iterations", type=int, default=12_500, help="training steps")
    linear.add_argument("--train-batch-size", type=int, default=128, help="heads' batch size")
    linear.add_argument("--learning-rates", type=float, nargs="+",
                        help="base learning rates, scaled by batch/256 (default: 13 values 1e-5 .. 0.1)")
    linear.add_argument("--n-last-blocks", type=int, nargs="+", default=[1, 4], help="CLS of the last n blocks")
    linear.add_argument("--avgpool", choices=["both", "yes", "no"], default="both",
                        help="append the mean patch token: both variants (default), only with, only without")
    linear.add_argument("--seed", type=int, default=0, help="random seed of the heads and their batches")
    linear.set_defaults(func=_eval_command, on_interrupt=_features_resume_hint)

    logreg = protocols.add_parser("logreg", help="L2 logistic regression, C swept on a 10%% hold-out")
    _add_common(logreg)
    logreg.add_argument("--output", help="write the report as JSON here")
    logreg.add_argument("--max-iter", type=int,
                        help="lbfgs iterations per C (default: 100 warm-started with scikit-learn, 1000 with cuML)")
    logreg.add_argument("--tol", type=float, default=1e-6, help="lbfgs stopping tolerance (scikit-learn)")
    logreg.add_argument("--backend", choices=["auto", "sklearn", "cuml"], default="auto",
                        help="auto: cuML when it is installed and a GPU is present, else scikit-learn")
    logreg.set_defaults(func=_eval_command, on_interrupt=_features_resume_hint)

    finetune = subparsers.add_parser("finetune", help="train a Dinov2ForImageClassification on labelled images")
    _add_common(finetune)
    finetune.add_argument("--output", required=True, help="directory for the best Hugging Face checkpoint")
    finetune.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    finetune.add_argument("--lr", type=float, help="head learning rate (default 1e-3 frozen, 1e-4 unfrozen)")
    finetune.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    finetune.add_argument("--unfreeze", action="store_true",
                          help="train the backbone too, with layer-wise lr decay (default: frozen backbone)")
    finetune.add_argument("--layer-decay", type=float, default=0.75,
                          help="with --unfreeze: each block lower gets this factor of the learning rate above it")
    finetune.add_argument("--train-batch-size", type=int, default=64, help="images per training step")
    finetune.add_argument("--seed", type=int, default=0, help="random seed of the head and the data order")
    finetune.set_defaults(func=_finetune_command)

    classify = subparsers.add_parser("classify", help="top-k labels of images with a classifier checkpoint")
    classify.add_argument("images", nargs="+", help="image files")
    classify.add_argument("--model", required=True, help="classifier directory (e.g. written by dinokit finetune)")
    classify.add_argument("--top-k", type=int, default=5, help="labels to print per image")
    classify.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    classify.add_argument("--json", action="store_true", help="print JSON instead of text")
    classify.set_defaults(func=_classify_command)


def _features_resume_hint(args) -> str | None:
    # Feature sets are cached whole (one per split): a rerun reads the finished ones and redoes the rest.
    return None if args.no_cache else f"{RERUN_TO_RESUME} (finished feature sets are read from the cache)"


def _cache_dir(args):
    return None if args.no_cache else args.cache_dir


def _eval_command(args) -> int:
    from dinokit.eval.evaluate import evaluate, format_table, write_json
    from dinokit.eval.linear import LINEAR_LEARNING_RATES, LinearProbeConfig

    options = {}
    if args.protocol == "knn":
        options = dict(ks=args.ks, temperature=args.temperature, n_per_class=args.n_per_class, n_tries=args.n_tries)
    elif args.protocol == "logreg":
        options = dict(max_iter=args.max_iter, tol=args.tol, backend=args.backend)
    else:
        avgpool = {"both": (False, True), "yes": (True,), "no": (False,)}[args.avgpool]
        options = dict(mode=args.mode, config=LinearProbeConfig(
            learning_rates=tuple(args.learning_rates or LINEAR_LEARNING_RATES), n_last_blocks=tuple(args.n_last_blocks),
            avgpool=avgpool, iterations=args.iterations, batch_size=args.train_batch_size, crop_size=args.crop,
            seed=args.seed))
    report = evaluate(args.protocol, args.model, args.train, args.val, batch_size=args.batch_size,
                      num_workers=args.num_workers, cache_dir=_cache_dir(args), device=args.device,
                      resize=args.resize, crop=args.crop, progress=not args.quiet, **options)
    print(format_table(report))
    if args.output:
        print(f"wrote {write_json(report, args.output)}")
    return 0


def _finetune_command(args) -> int:
    from dinokit.eval.evaluate import select_device
    from dinokit.eval.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, unfreeze=args.unfreeze, layer_decay=args.layer_decay,
                            seed=args.seed)
    result = finetune(args.model, args.train, args.val, args.output, config, num_workers=args.num_workers,
                      device=select_device(args.device), cache_dir=_cache_dir(args), resize_size=args.resize,
                      crop_size=args.crop, feature_batch_size=args.batch_size, progress=not args.quiet)
    print(f"best val top-1 {result['best_val_top1']:.2f}% at epoch {result['best_epoch']}; "
          f"checkpoint in {result['output']}")
    return 0


def _classify_command(args) -> int:
    from dinokit.eval.classify import classify_images
    from dinokit.eval.evaluate import select_device

    predictions = classify_images(args.images, args.model, top_k=args.top_k, device=select_device(args.device))
    if args.json:
        json.dump(predictions, sys.stdout, indent=2)
        print()
        return 0
    from dinokit.data.images import display_path

    for item in predictions:
        print(display_path(item["image"]))  # a non-UTF-8 file name cannot be printed as it is
        for guess in item["top_k"]:
            print(f"  {guess['score']:.4f}  {guess['label']}")
    return 0
