"""Triton Python model "stable_diffusion" of the ONNX repositories: the engine on onnxruntime models by BLS.

Requests, parameters, outputs and errors are those of model_repository/stable_diffusion; the
difference is where the graphs run: `run` below calls this repository's "unet", "text_encoder"
("text_encoder_2" too for SDXL) and "vae_decoder" models (`engine/onnx_pipeline.py` wires them into
the engine), while the per-request concept math stays here. deploy/triton/README.md, "ONNX
variant", documents it. model_repository_onnx_sdxl/stable_diffusion/1/model.py is this file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from concepts.base import load_base
from concepts.errors import CustomDiffError, InvalidArgument, Unavailable
from concepts.store import ArtifactStore
from engine.onnx_export import graph_io
from engine.onnx_pipeline import exported_engine
from engine.onnx_unet import GRAPH_FILE, UNET, Run
from services.inference.triton_model import observe, respond
from services.inference.triton_protocol import ModelSettings

log = logging.getLogger("customdiff.triton")


def run(model: str, outputs: list[str]) -> Run:
    """Call `model` through BLS for `outputs` (its graph's); tensors pass by DLPack (no copy here, on the CPU
    or the GPU)."""
    def call(inputs: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(tensor.contiguous()))
                    for name, tensor in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise Unavailable(f"model {model}: {response.error().message()}")
        # .clone(): the response owns that memory.
        tensors = tuple(torch.from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack()).clone()
                        for name in outputs)
        return tensors if len(tensors) > 1 else tensors[0]

    return call


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        """Load the base for the concept math and check that the exported UNet was made from it."""
        config = json.loads(args["model_config"])
        try:
            settings = ModelSettings.from_config(config.get("parameters", {}), os.environ)
            if settings.dtype != "float32":
                raise InvalidArgument("dtype", f"must be float32, the graphs' type, got {settings.dtype!r}")
            if settings.compose != "sum":  # a merge runs the torch text encoder, which the graphs replace
                raise InvalidArgument("compose", f"must be sum in the ONNX repository, got {settings.compose!r}")
            gpu = args["model_instance_kind"] == "GPU"
            device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
            repository = Path(args["model_repository"]).parent
            unet_onnx = repository / UNET / "1" / GRAPH_FILE

            def run_for(model: str) -> Run:
                return run(model, list(graph_io(repository / model / "1" / GRAPH_FILE)["outputs"]))

            observer, self.stop_tracing = observe(args)
            self.engine = exported_engine(
                load_base(settings.base_model, device=device), ArtifactStore(settings.store_url), run_for,
                unet_onnx, cache_bytes=settings.cache_bytes, host_cache_bytes=settings.host_cache_bytes,
                max_batch_images=settings.max_batch_images, observer=observer)
        except CustomDiffError as e:
            raise pb_utils.TritonModelException(f"stable_diffusion (ONNX repository): {e}") from e
        log.info("stable_diffusion (ONNX) instance %s: base %s (fingerprint %s) on %s, graphs in %s",
                 args["model_instance_name"], settings.base_model, self.engine.base.fingerprint, device,
                 unet_onnx.parents[2])

    def execute(self, requests: list) -> list:
        """One response per request, in order; the batch's valid requests share the graphs' calls."""
        return respond(self.engine, requests, "stable_diffusion (ONNX)")

    def finalize(self) -> None:
        """Flush the spans."""
        if self.stop_tracing is not None:
            self.stop_tracing()
