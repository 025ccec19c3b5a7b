"""``fusion-engine export``: a saved model as one ONNX graph, checked against torch on real images."""

from __future__ import annotations

import json

from fusion_engine.artifacts.manifest import read_manifest
from fusion_engine.cli.common import add_key_options, load_run_dir
from fusion_engine.errors import ExportError
from fusion_engine.runtime.export import INT8_MIN_AGREEMENT, TOLERANCE, export_onnx


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a saved model to ONNX, checked against torch on real images")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        metavar="N",
        help="fixed input height [width] (default: the largest branch input size)",
    )
    p.add_argument(
        "--check-data",
        default="digits",
        help="real images for the parity check: image folder, .npz or 'digits' (default)",
    )
    p.add_argument("--check-images", type=int, default=64, help="how many images the parity check uses")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="max abs probability difference allowed")
    p.add_argument(
        "--int8",
        action="store_true",
        help="quantise the graph to static int8 (onnxruntime.quantization), calibrated on --calibration-data; "
        f"written only if its top-1 agrees with torch's on at least {INT8_MIN_AGREEMENT:.0%} of the check images",
    )
    p.add_argument(
        "--calibration-data",
        help="with --int8: images to calibrate on (folder, .npz or cifar10-sample; a few hundred training images)",
    )
    add_key_options(p)
    p.add_argument(
        "--sign-key",
        metavar="PRIVATE_KEY",
        help="sign the exported file with this Ed25519 private key into FILE.onnx.sig "
        "(checked by `predict FILE.onnx --runtime onnx --public-key`)",
    )
    p.add_argument(
        "--allow-plaintext", action="store_true", help="export an encrypted model (the ONNX file is not encrypted)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    """``fusion-engine export RUN_DIR --format onnx --out FILE``"""
    if read_manifest(args.run_dir)[0].encrypted and not args.allow_plaintext:
        raise ExportError(
            f"{args.run_dir} is encrypted and an ONNX file holds its weights in plain text; "
            "pass --allow-plaintext to export it anyway"
        )
    model = load_run_dir(args)
    manifest = model.manifest
    size = None
    if args.input_size:
        size = args.input_size[0] if len(args.input_size) == 1 else args.input_size[:2]
    result = export_onnx(
        model,
        args.out,
        input_size=size,
        check_data=args.check_data,
        check_count=args.check_images,
        tolerance=args.tolerance,
        source={"run_dir": str(args.run_dir), "files": manifest.files},
        signing_key=args.sign_key,
        int8=args.int8,
        calibration_data=args.calibration_data,
    )
    if args.json:
        print(json.dumps(result))
    else:
        limit = (
            f"int8, calibrated on {result['calibration_data']}; top-1 agreement needed {INT8_MIN_AGREEMENT}"
            if result.get("int8")
            else f"tolerance {result['tolerance']:g}"
        )
        print(
            f"wrote {result['path']}: input {result['input']['shape']} float32 in [0, 1]; "
            f"checked on {result['images']} images from {result['check_data']}: max abs probability difference "
            f"{result['max_abs_diff']:.2e} ({limit}), top-1 agreement {result['top1_agreement']:.3f}"
        )
        if "signature" in result:
            print(f"signed {result['signature']} (key fingerprint {result['signed_by']})")
    return 0
