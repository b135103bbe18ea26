"""`dinokit export onnx | torchscript`: thin commands over `dinokit.export`."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a model to ONNX (fp32 / int8) or TorchScript")
    formats = parser.add_subparsers(dest="format", required=True)

    p = formats.add_parser("onnx", help="ONNX with dynamic batch, height and width; optional int8 copy")
    p.add_argument("--model", "-m", required=True, help="model directory, hub id, checkpoint file or preset")
    p.add_argument("--out", "-o", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; antialiased models need >= 18 unless "
                                                         "--sizes bakes the grids in)")
    p.add_argument("--sizes", default=None,
                   help="input sizes, e.g. 224,518,224x308 (HxW, multiples of the patch size: 14 DINOv2, 16 DINOv3): checked at export; with "
                        "--positions precomputed the only sizes the file accepts (default check: 224, native, "
                        "224x308)")
    p.add_argument("--positions", choices=["auto", "dynamic", "precomputed"], default="auto",
                   help="position grid: resampled in the graph (any size) or precomputed for --sizes")
    p.add_argument("--int8", action="store_true", help="also write OUT with .int8.onnx: int8 linear layers, "
                                                       "with an accuracy check against fp32")
    p.add_argument("--per-channel", action="store_true", help="int8 with per-channel weight scales (slower, "
                                                              "closer to fp32)")
    p.add_argument("--check-images", default=None,
                   help="folder of real images for the int8 cosine check (default: ../shared/datasets/imagenette/"
                        "val beside the checkout when present, else generated images)")
    p.add_argument("--check-count", type=int, default=64, help="images for the int8 cosine check")
    p.add_argument("--knn-images", default=None,
                   help="labelled ImageFolder for the int8 k-NN accuracy delta (optional)")
    p.add_argument("--knn-per-class", type=int, default=20, help="images per class for the k-NN check")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=_onnx)

    p = formats.add_parser("torchscript", help="TorchScript trace valid at any input size (torch.jit.load)")
    p.add_argument("--model", "-m", required=True, help="model directory, hub id, checkpoint file or preset")
    p.add_argument("--out", "-o", required=True, help="output file (.pt)")
    p.add_argument("--sizes", default=None, help="sizes to check the trace at, e.g. 224,518,224x308")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=_torchscript)


def int8_path(out: Path) -> Path:
    return out.with_name(out.stem + ".int8.onnx")


def _onnx(args) -> int:
    from dinokit.export import onnx as onnx_export
    from dinokit.export import quantize

    out = Path(args.out)
    if args.int8 and args.check_images and not Path(args.check_images).is_dir():
        raise FileNotFoundError(f"--check-images {args.check_images} is not a folder")
    report = onnx_export.export_onnx(args.model, out, opset=args.opset, sizes=onnx_export.parse_sizes(args.sizes),
                                     positions=args.positions)
    print(f"wrote {report.summary()}")
    if not args.int8:
        return 0
    quantized = quantize.quantize_onnx(out, int8_path(out), per_channel=args.per_channel)
    size = (report.sizes or [(224, 224)])[0]
    folder = Path(args.check_images) if args.check_images else quantize.default_check_images()
    if folder is not None:
        pixels, source = quantize.folder_images(folder, args.check_count, size), f"real images from {folder}"
    else:
        pixels, source = quantize.generated_images(args.check_count, size), "generated images"
    print(f"wrote {quantized}")
    print(quantize.agreement(out, quantized, pixels, source).summary())
    if args.knn_images:
        print(quantize.knn_delta(out, quantized, args.knn_images, per_class=args.knn_per_class).summary())
    return 0


def _torchscript(args) -> int:
    from dinokit.export.onnx import parse_sizes
    from dinokit.export.torchscript import export_torchscript

    report = export_torchscript(args.model, args.out, sizes=parse_sizes(args.sizes))
    print(f"wrote {report.summary()}")
    return 0
