"""Export a Stable Diffusion base to ONNX for Triton's onnxruntime backend, with concepts left out.

A concept changes only the cross-attention K/V and the prompt's token embeddings, so the graphs
take those as inputs and one export serves every concept (docs/deploy.md, "ONNX variant"):

    unet/1/model.onnx          sample [B, 4, h, w] f32, timestep [B, 1] f32, k [B, T, W] f32, v [B, T, W] f32
                               (+ text_embeds [B, P] f32, time_ids [B, 6] f32 for a "text_time" UNet: SDXL)
                               -> noise_pred [B, 4, h, w] f32        (packed K/V: `onnx_unet.py`)
    text_encoder/1/model.onnx  inputs_embeds [B, L, hidden] f32 -> last_hidden_state [B, L, hidden] f32
    vae_decoder/1/model.onnx   latent_sample [B, 4, h, w] f32 -> image [B, 3, 8h, 8w] f32 in [-1, 1]

A base with two text encoders (SDXL) conditions on their penultimate states, and on the last one's
pooled output, which the engine takes from its last hidden state (at the end token, through its
projection: `concepts.conditioning`, in torch):

    text_encoder/1/model.onnx    inputs_embeds [B, L, hidden] f32 -> penultimate_hidden_state [B, L, hidden] f32
    text_encoder_2/1/model.onnx  inputs_embeds [B, L, hidden_2] f32
                                 -> penultimate_hidden_state, last_hidden_state [B, L, hidden_2] f32

B, h, w and T are dynamic; L is the tokenizer's length (77), fixed because CLIP's causal mask and
position embeddings are. W (Σ heads·head_dim over the cross-attention layers), hidden and P are the
base's, but declared dynamic so that one Triton config fits every base (Triton rejects a config
dim of -1 where the graph's is fixed). `latent_sample` is already divided by the VAE's scaling
factor. Opset 17, float32, weights in ``model.onnx.data`` beside each graph; every
file passes `onnx.checker` with full shape inference. The UNet's metadata holds the base
fingerprint, the packed K/V layout and its added-condition inputs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from concepts.base import BaseModel, load_base
from concepts.errors import InvalidArgument
from concepts.progress import StageBar
from engine.kv import install_kv_processors, precomputed_kv
from engine.onnx_unet import (
    ADDED_CONDITIONS,
    GRAPH_FILE,
    META_ADDED,
    META_FINGERPRINT,
    META_LAYOUT,
    OUTPUTS,
    PENULTIMATE,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
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
TIME_IDS = 6  # SDXL's time ids: original size, crop top-left, target size (`Engine.added_conditions`)


class _KVInputUNet(nn.Module):
    """The UNet with every attn2 layer reading its K/V from the packed inputs (and SDXL's added conditions)."""

    def __init__(self, unet: nn.Module, layout: tuple[KVLayer, ...]) -> None:
        super().__init__()
        self.unet = unet
        self.layout = layout

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        # The UNet's signature wants a text embedding; the K/V processors never read it (the trace drops it).
        text = sample.new_zeros(sample.shape[0], 1, self.unet.config.cross_attention_dim)
        conditions = dict(zip(ADDED_CONDITIONS, added)) if added else None
        with precomputed_kv(unpack_kv(k, v, self.layout)):
            return self.unet(sample, timestep.reshape(-1), encoder_hidden_states=text, added_cond_kwargs=conditions,
                             return_dict=False)[0]


class _EmbedsTextEncoder(nn.Module):
    """The CLIP text model from token embeddings: its own forward, the embedding lookup's output replaced.

    Returns its last hidden state; with `penultimate` (a base with two text encoders) the states before
    its last layer instead, and with `last` too the last hidden state after them.
    """

    def __init__(self, text_encoder: nn.Module, penultimate: bool, last: bool) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.penultimate = penultimate
        self.last = last

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The ids only shape the call (and the pooled output, which the graph does not return).
        ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long)
        embedding = self.text_encoder.get_input_embeddings()
        hook = embedding.register_forward_hook(lambda module, args, output: inputs_embeds)
        try:
            out = self.text_encoder(ids, output_hidden_states=self.penultimate)
        finally:
            hook.remove()
        if not self.penultimate:
            return out.last_hidden_state
        return (out.hidden_states[-2], out.last_hidden_state) if self.last else out.hidden_states[-2]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def export_onnx(base_dir: str | Path, out_dir: str | Path, opset: int = OPSET, progress: bool = False,
                ) -> dict[str, Any]:
    """Write ``<out_dir>/{unet,text_encoder,vae_decoder}/1/model.onnx`` (plus weights) for the base, and
    ``text_encoder_2`` for a base with a second text encoder.

    `out_dir` may be a copy of ``deploy/triton/model_repository_onnx`` (``model_repository_onnx_sdxl`` for
    an SDXL base): the files land in its version directories. Existing graphs there are replaced.
    `progress` shows a bar over the stages (loading, then each graph's trace and check) on a terminal
    (`concepts.progress`).

    Returns:
        what `graph_io` reads back from each written file, by model name, plus ``opset``,
        ``base_fingerprint``, ``kv_layout`` ([path, heads, head_dim] per cross-attention layer) and
        ``added_conditions`` (the UNet's added-condition inputs).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidArgument("opset", f"must be within [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    with StageBar("export-onnx", ("loading base", UNET, "text encoders", VAE_DECODER), enabled=progress) as stages:
        base = load_base(base_dir)
        stages.next()
        out = Path(out_dir)
        layout = kv_layout(install_kv_processors(base.unet))
        # An odd latent size makes the trace take diffusers' explicit-upsample-size path, so the graph
        # serves any latent size (an even one would bake in "double the size" at every upsampler).
        size = base.unet.config.sample_size + 1
        added = _export_unet(base, layout, size, out / UNET / "1" / GRAPH_FILE, opset)
        stages.next()
        names = _export_text_encoders(base, out, opset)
        stages.next()
        latents = torch.randn(2, base.vae.config.latent_channels, size, size)
        _export(_VaeDecoder(base.vae), (latents,), out / VAE_DECODER / "1" / GRAPH_FILE, opset,
                {"latent_sample": {0: "batch", 2: "height", 3: "width"}},
                {OUTPUTS[VAE_DECODER]: {0: "batch", 2: "image_height", 3: "image_width"}},
                {META_FINGERPRINT: base.fingerprint})
        stages.next()
    summary: dict[str, Any] = {name: graph_io(out / name / "1" / GRAPH_FILE)
                               for name in (UNET, *names, VAE_DECODER)}
    summary.update(opset=opset, base_fingerprint=base.fingerprint, added_conditions=list(added),
                   kv_layout=[[layer.path, layer.heads, layer.head_dim] for layer in layout])
    return summary


def _added_conditions(unet: nn.Module, rows: int) -> dict[str, torch.Tensor]:
    """Example inputs of the UNet's added conditions, read from its config: SDXL's ("text_time") pooled text
    and time ids, or none.

    Raises:
        InvalidArgument: another ``addition_embed_type`` (the engine gives the UNet none of those).
    """
    config = unet.config
    if config.addition_embed_type is None:
        return {}
    if config.addition_embed_type != "text_time":
        raise InvalidArgument("base", f"a UNet with addition_embed_type {config.addition_embed_type!r} is not "
                                      f"supported (only 'text_time', SDXL's)")
    pooled = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(rows, TIME_IDS)
    return dict(zip(ADDED_CONDITIONS, (torch.randn(rows, pooled), ids)))


def _export_unet(base: BaseModel, layout: tuple[KVLayer, ...], size: int, target: Path, opset: int,
                 ) -> tuple[str, ...]:
    """The UNet with K/V (and its added conditions) as inputs; returns the added-condition inputs."""
    tokens, width = base.tokenizer.model_max_length, sum(layer.width for layer in layout)
    added = _added_conditions(base.unet, 2)
    args = (torch.randn(2, base.unet.config.in_channels, size, size), torch.tensor([[981.0], [981.0]]),
            torch.randn(2, tokens, width), torch.randn(2, tokens, width), *added.values())
    latent = {0: "batch", 2: "height", 3: "width"}
    inputs = {"sample": latent, "timestep": {0: "batch"}, "k": {0: "batch", 1: "tokens", 2: "kv_width"},
              "v": {0: "batch", 1: "tokens", 2: "kv_width"}}
    inputs.update({"text_embeds": {0: "batch", 1: "pooled_width"}, "time_ids": {0: "batch"}} if added else {})
    _export(_KVInputUNet(base.unet, layout), args, target, opset, inputs, {OUTPUTS[UNET]: latent},
            {META_FINGERPRINT: base.fingerprint, META_LAYOUT: layout_to_json(layout),
             META_ADDED: json.dumps(list(added))})
    return tuple(added)


def _export_text_encoders(base: BaseModel, out: Path, opset: int) -> tuple[str, ...]:
    """One graph per text encoder, each returning what the engine reads of it (module doc); returns their names."""
    pairs = base.text_pairs
    names = (TEXT_ENCODER, TEXT_ENCODER_2)[: len(pairs)]
    two = len(pairs) > 1
    for i, (name, (tokenizer, encoder)) in enumerate(zip(names, pairs)):
        last = not two or i == len(pairs) - 1  # `text.PromptEncoder.encode` pools the last encoder's
        states = {0: "batch", 2: "hidden"}
        outputs = {**({PENULTIMATE: states} if two else {}), **({OUTPUTS[TEXT_ENCODER]: states} if last else {})}
        embeds = torch.randn(2, tokenizer.model_max_length, encoder.get_input_embeddings().weight.shape[1])
        _export(_EmbedsTextEncoder(encoder, two, last), (embeds,), out / name / "1" / GRAPH_FILE, opset,
                {"inputs_embeds": states}, outputs, {META_FINGERPRINT: base.fingerprint})
    return names


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
    results = module(*args)
    for output, result in zip(model.graph.output, results if isinstance(results, tuple) else (results,)):
        for axis, dim in enumerate(output.type.tensor_type.shape.dim):
            if axis not in outputs[output.name]:
                dim.dim_value = result.shape[axis]
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
