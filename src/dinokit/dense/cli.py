"""`dinokit segment train|predict` and `dinokit depth train|predict`: thin wrappers over dinokit.dense."""

from __future__ import annotations

import argparse
import json


class _AnyName(dict):
    """A subcommand table that, once `open` is set (after its subcommands are added), accepts every first word;
    the action below routes the unknown ones to `predict`."""

    open = False

    def __contains__(self, key) -> bool:
        return self.open or dict.__contains__(self, key)


class _PredictByDefault(argparse._SubParsersAction):
    """`dinokit depth IMAGE... -o DIR` is `dinokit depth predict IMAGE... -o DIR`: a first word that is not a
    subcommand is an input of `predict`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._name_parser_map = self.choices = _AnyName()

    def __call__(self, parser, namespace, values, option_string=None):
        if values and not dict.__contains__(self._name_parser_map, values[0]):
            values = ["predict", *values]
        super().__call__(parser, namespace, values, option_string)


def _common_train(parser, targets: str, lr: float) -> None:
    parser.add_argument("--model", required=True,
                        help="backbone: model directory, hub id, Meta/timm checkpoint file, or preset (vits14, dinov3_vits16 = random)")
    parser.add_argument("--train", required=True, help=f"training folder: images/<stem>.jpg|png + {targets}/<stem>.png")
    parser.add_argument("--val", required=True, help=f"validation folder, same layout (images/ + {targets}/)")
    parser.add_argument("--output", required=True, help="folder for the trained model and metrics.json")
    parser.add_argument("--size", type=int, default=518, help="images are resized to this short side")
    parser.add_argument("--epochs", type=float, default=100.0,
                        help="passes over the training images (at most 40k steps); stops earlier on a plateau")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop once the training loss has not improved for this many epochs")
    parser.add_argument("--cooldown", type=float, default=20.0,
                        help="epochs after a plateau over which the learning rate falls linearly to 0 before "
                             "stopping (0: stop at once)")
    parser.add_argument("--no-early-stop", action="store_true", help="train all --epochs (no plateau stop)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="exactly this many head steps instead of --epochs (no plateau stop; 2000 was the "
                             "default before --epochs existed)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per head training step")
    parser.add_argument("--lr", type=float, default=lr, help=f"AdamW peak learning rate (poly decay; default {lr:g})")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the head and its batches")
    parser.add_argument("--cache-dir", default="default",
                        help="feature cache folder (default: $DINOKIT_CACHE/features or ~/.cache/dinokit/features)")
    parser.add_argument("--no-cache", action="store_true", help="recompute features, do not read or write the cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    segment = subparsers.add_parser("segment", help="semantic segmentation heads on frozen DINOv2 / DINOv3 ViT patch features")
    actions = segment.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a linear or ms head; writes the model and metrics.json (mIoU)")
    _common_train(train, "masks", SEGMENT_LR)
    train.add_argument("--num-classes", type=int, help="number of classes (default: largest mask value + 1)")
    train.add_argument("--ignore-index", type=int, default=255, help="mask value left out of loss and metrics")
    train.add_argument("--head", choices=["linear", "ms"], default="linear",
                       help="linear: last block; ms: last 4 blocks concatenated (Meta's heads)")
    train.add_argument("--binarize", action="store_true",
                       help="every non-zero mask value (except the ignore index) is class 1, e.g. instance ids")
    train.add_argument("--loss-resolution", type=_loss_resolution, default=DEFAULT_LOSS_RESOLUTION,
                       help="label cells per patch side the loss compares at (1 to the patch size; the patch "
                            "size = the full resized image) or 'full' (the former F.interpolate path)")
    train.set_defaults(func=_segment_train)
    predict = actions.add_parser("predict", help="write <stem>.png class-index masks and <stem>_overlay.png")
    predict.add_argument("inputs", nargs="+", help="image files or folders of images")
    predict.add_argument("--model", required=True, help="folder written by `dinokit segment train`")
    predict.add_argument("--output", "-o", required=True, help="folder for the masks and overlays")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_segment_predict)

    depth = subparsers.add_parser("depth", help="monocular depth heads on frozen DINOv2 / DINOv3 ViT features "
                                               "(`dinokit depth IMAGE... -o DIR` = `dinokit depth predict ...`)")
    actions = depth.add_subparsers(dest="action", required=True, action=_PredictByDefault)
    train = actions.add_parser("train", help="train Meta's linear depth head (256 bins) with Meta's SigLoss")
    _common_train(train, "depth", DEPTH_LR)
    train.add_argument("--depth-scale", type=float, default=1000.0,
                       help="depth PNG value per metre (1000: millimetres)")
    train.add_argument("--min-depth", type=float, default=0.001, help="smallest depth (m) of the bins and metrics")
    train.add_argument("--max-depth", type=float, default=10.0, help="largest depth (m) of the bins and metrics")
    train.add_argument("--layers", type=int, choices=[1, 4], default=4, help="blocks read: the last, or 4 spread")
    train.set_defaults(func=_depth_train)
    predict = actions.add_parser("predict", help="write <stem>_depth.png (colour) and <stem>_depth16.png (16-bit)")
    predict.add_argument("inputs", nargs="+", help="image files or folders of images")
    predict.add_argument("--model", required=True,
                         help="folder written by `dinokit depth train`, or a transformers DPT / Depth Anything folder")
    predict.add_argument("--output", "-o", required=True, help="folder for the depth pictures")
    predict.add_argument("--depth-scale", type=float, default=1000.0, help="16-bit PNG value per metre")
    predict.add_argument("--size", type=int, help="short side (default: the model folder's preprocessing, or 518)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_depth_predict)
    actions.choices.open = True


# The training defaults of dense.pixel_loss / dense.segment / dense.depth_train (not imported: the CLI loads torch
# lazily; tests/test_dense_head_training.py holds them equal)
DEFAULT_LOSS_RESOLUTION = 7
SEGMENT_LR = 1e-3
DEPTH_LR = 3e-3


def _loss_resolution(text: str) -> int | None:
    if text == "full":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of label cells per patch side or 'full'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 label cell per patch side (or 'full')")
    return value


def _schedule(args) -> dict:
    return dict(iterations=args.iterations, epochs=args.epochs, patience=None if args.no_early_stop else args.patience,
                cooldown=args.cooldown, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                seed=args.seed)


def _cache(args):
    return None if args.no_cache else args.cache_dir


def _segment_train(args) -> int:
    from dinokit.dense.segment import SegTrainConfig, train_segmentation

    config = SegTrainConfig(**_schedule(args), loss_resolution=args.loss_resolution)
    metrics = train_segmentation(args.model, args.train, args.val, args.output, num_classes=args.num_classes,
                                 ignore_index=args.ignore_index, head=args.head, size=args.size,
                                 binarize=args.binarize, config=config, cache_dir=_cache(args),
                                 progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("miou", "pixel_accuracy", "per_class_iou", "train_steps",
                                              "stop_reason")}, indent=2))
    print(f"wrote {args.output}")
    return 0


def _segment_predict(args) -> int:
    from dinokit.dense.segment import predict_segmentation

    written = predict_segmentation(args.inputs, args.model, args.output, progress=not args.quiet)
    print(f"wrote {len(written)} files to {args.output}")
    return 0


def _depth_train(args) -> int:
    from dinokit.dense.depth_train import DepthTrainConfig, train_depth

    config = DepthTrainConfig(**_schedule(args))
    metrics = train_depth(args.model, args.train, args.val, args.output, depth_scale=args.depth_scale,
                          min_depth=args.min_depth, max_depth=args.max_depth, layers=args.layers, size=args.size,
                          config=config, cache_dir=_cache(args), progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("abs_rel", "rmse", "log10", "a1", "a2", "a3", "train_steps",
                                              "stop_reason")}, indent=2))
    print(f"wrote {args.output}")
    return 0


def _depth_predict(args) -> int:
    from dinokit.dense.depth_train import predict_depth

    written = predict_depth(args.inputs, args.model, args.output, depth_scale=args.depth_scale, size=args.size,
                            progress=not args.quiet)
    print(f"wrote {len(written)} files to {args.output}")
    return 0
