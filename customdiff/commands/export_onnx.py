"""`customdiff export-onnx BASE_DIR OUT_DIR`: UNet (K/V as inputs), text encoder(s) and VAE decoder as ONNX."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export-onnx", help="export the base to ONNX for Triton's onnxruntime backend (concepts stay per "
                            "request)")
    export.add_argument("base_dir", metavar="BASE_DIR", help="diffusers Stable Diffusion directory")
    export.add_argument("out_dir", metavar="OUT_DIR",
                        help="writes OUT_DIR/{unet,text_encoder,vae_decoder}/1/model.onnx (and text_encoder_2 "
                             "for SDXL); may be a copy of deploy/triton/model_repository_onnx "
                             "(model_repository_onnx_sdxl for SDXL)")
    export.add_argument("--opset", type=int, help="ONNX opset, 14 to 20 (default 17)")
    export.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from concepts.base import check_base_dir
    from engine.onnx_export import OPSET, export_onnx

    summary = export_onnx(check_base_dir(args.base_dir, "BASE_DIR"), args.out_dir, opset=args.opset or OPSET,
                          progress=True)
    print(json.dumps(summary))
    return 0
