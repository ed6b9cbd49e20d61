"""Export a Stable Diffusion base to ONNX for Triton's onnxruntime backend, with concepts left out.

A concept changes only the cross-attention K/V and the prompt's token embeddings, so the graphs
take those as inputs and one export serves every concept (docs/deploy.md, "ONNX variant"):

    unet/1/model.onnx          sample [B, 4, h, w] f32, timestep [B, 1] f32, k [B, T, W] f32, v [B, T, W] f32
                               -> noise_pred [B, 4, h, w] f32        (packed K/V: `onnx_unet.py`)
    text_encoder/1/model.onnx  inputs_embeds [B, L, hidden] f32 -> last_hidden_state [B, L, hidden] f32
    vae_decoder/1/model.onnx   latent_sample [B, 4, h, w] f32 -> image [B, 3, 8h, 8w] f32 in [-1, 1]

B, h, w and T are dynamic; L is the tokenizer's length (77), fixed because CLIP's causal mask and
position embeddings are. W (Σ heads·head_dim over the cross-attention layers) and hidden are the
base's, but declared dynamic so that one Triton config fits every base (Triton rejects a config
dim of -1 where the graph's is fixed). `latent_sample` is already divided by the VAE's scaling
factor. Opset 17, float32, weights in ``model.onnx.data`` beside each graph; every
file passes `onnx.checker` with full shape inference. The UNet's metadata holds the base
fingerprint and the packed K/V layout.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from concepts.base import load_base
from concepts.errors import InvalidArgument
from concepts.progress import StageBar
from engine.kv import install_kv_processors, precomputed_kv
from engine.onnx_unet import (
    GRAPH_FILE,
    META_FINGERPRINT,
    META_LAYOUT,
    OUTPUTS,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    KVLayer,
    kv_layout,
    layout_to_json,
    unpack_kv,
)

OPSET = 17
# Attention exports as one op from 14 on; the TorchScript exporter stops at 20.
MIN_OPSET, MAX_OPSET = 14, 20
# ONNX element types (onnx.TensorProto) by name, for `graph_io`.
_ELEM_TYPES = {1: "float32", 7: "int64", 10: "float16"}


class _KVInputUNet(nn.Module):
    """The UNet with every attn2 layer reading its K/V from the packed inputs."""

    def __init__(self, unet: nn.Module, layout: tuple[KVLayer, ...]) -> None:
        super().__init__()
        self.unet = unet
        self.layout = layout

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ) -> torch.Tensor:
        # The UNet's signature wants a text embedding; the K/V processors never read it (the trace drops it).
        text = sample.new_zeros(sample.shape[0], 1, self.unet.config.cross_attention_dim)
        with precomputed_kv(unpack_kv(k, v, self.layout)):
            return self.unet(sample, timestep.reshape(-1), encoder_hidden_states=text, return_dict=False)[0]


class _EmbedsTextEncoder(nn.Module):
    """The CLIP text model from token embeddings: its own forward, the embedding lookup's output replaced."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        # The ids only shape the call (and the pooled output, which the graph does not return).
        ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long)
        embedding = self.text_encoder.get_input_embeddings()
        hook = embedding.register_forward_hook(lambda module, args, output: inputs_embeds)
        try:
            return self.text_encoder(ids)[0]
        finally:
            hook.remove()


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def export_onnx(base_dir: str | Path, out_dir: str | Path, opset: int = OPSET, progress: bool = False,
                ) -> dict[str, Any]:
    """Write ``<out_dir>/{unet,text_encoder,vae_decoder}/1/model.onnx`` (plus weights) for the base.

    `out_dir` may be a copy of ``deploy/triton/model_repository_onnx``: the files land in its version
    directories. Existing graphs there are replaced. `progress` shows a bar over the stages (loading,
    then each graph's trace and check) on a terminal (`concepts.progress`).

    Returns:
        what `graph_io` reads back from each written file, by model name, plus ``opset``,
        ``base_fingerprint`` and ``kv_layout`` ([path, heads, head_dim] per cross-attention layer).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidArgument("opset", f"must be within [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    with StageBar("export-onnx", ("loading base", UNET, TEXT_ENCODER, VAE_DECODER), enabled=progress) as stages:
        base = load_base(base_dir)
        stages.next()
        out = Path(out_dir)
        layout = kv_layout(install_kv_processors(base.unet))
        tokens, hidden = base.tokenizer.model_max_length, base.text_encoder.config.hidden_size
        width = sum(layer.width for layer in layout)
        # An odd latent size makes the trace take diffusers' explicit-upsample-size path, so the graph
        # serves any latent size (an even one would bake in "double the size" at every upsampler).
        size = base.unet.config.sample_size + 1
        unet_args = (torch.randn(2, base.unet.config.in_channels, size, size), torch.tensor([[981.0], [981.0]]),
                     torch.randn(2, tokens, width), torch.randn(2, tokens, width))
        latent = {0: "batch", 2: "height", 3: "width"}
        _export(_KVInputUNet(base.unet, layout), unet_args, out / UNET / "1" / GRAPH_FILE, opset,
                {"sample": latent, "timestep": {0: "batch"}, "k": {0: "batch", 1: "tokens", 2: "kv_width"},
                 "v": {0: "batch", 1: "tokens", 2: "kv_width"}}, {OUTPUTS[UNET]: latent},
                {META_FINGERPRINT: base.fingerprint, META_LAYOUT: layout_to_json(layout)})
        stages.next()
        _export(_EmbedsTextEncoder(base.text_encoder), (torch.randn(2, tokens, hidden),),
                out / TEXT_ENCODER / "1" / GRAPH_FILE, opset, {"inputs_embeds": {0: "batch", 2: "hidden"}},
                {OUTPUTS[TEXT_ENCODER]: {0: "batch", 2: "hidden"}}, {META_FINGERPRINT: base.fingerprint})
        stages.next()
        latents = torch.randn(2, base.vae.config.latent_channels, size, size)
        _export(_VaeDecoder(base.vae), (latents,), out / VAE_DECODER / "1" / GRAPH_FILE, opset,
                {"latent_sample": latent},
                {OUTPUTS[VAE_DECODER]: {0: "batch", 2: "image_height", 3: "image_width"}},
                {META_FINGERPRINT: base.fingerprint})
        stages.next()
    summary: dict[str, Any] = {name: graph_io(out / name / "1" / GRAPH_FILE)
                               for name in (UNET, TEXT_ENCODER, VAE_DECODER)}
    summary.update(opset=opset, base_fingerprint=base.fingerprint,
                   kv_layout=[[layer.path, layer.heads, layer.head_dim] for layer in layout])
    return summary


@torch.no_grad()
def _export(module: nn.Module, args: tuple[torch.Tensor, ...], target: Path, opset: int,
            inputs: dict[str, dict[int, str]], outputs: dict[str, dict[int, str]],
            metadata: dict[str, str]) -> None:
    """Trace `module` on `args` into `target` (weights in ``model.onnx.data`` beside it) and check it."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / GRAPH_FILE
        # The TorchScript exporter: its `dynamic_axes` keep the dims symbolic through diffusers' Python
        # shape arithmetic; torch.export would specialize or refuse on its shape checks.
        torch.onnx.export(module.eval(), args, str(raw), dynamo=False, opset_version=opset,
                          input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={**inputs, **outputs})
        model = onnx.load(str(raw))  # also reads the per-tensor files the exporter writes above 2 GB
    # The exporter names some output dims it could not infer; all but the dynamic ones are the traced sizes.
    (output,), shape = model.graph.output, module(*args).shape
    for axis, dim in enumerate(output.type.tensor_type.shape.dim):
        if axis not in outputs[output.name]:
            dim.dim_value = shape[axis]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = target.with_name(GRAPH_FILE + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)
    data.chmod(target.stat().st_mode & 0o777)  # onnx makes it owner-only; the server may be another user
    onnx.checker.check_model(str(target), full_check=True)


def graph_io(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """An ONNX file's inputs and outputs: ``{"inputs"|"outputs": {name: {"dtype", "shape"}}}``.

    A shape lists ints for fixed dims and names (e.g. ``"batch"``) for dynamic ones.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values) -> dict[str, dict[str, Any]]:
        return {value.name: {"dtype": _ELEM_TYPES[value.type.tensor_type.elem_type],
                             "shape": [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]}
                for value in values}

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}
