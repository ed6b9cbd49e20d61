"""Running the exported UNet (`onnx_export.py`) with the engine's per-sample cross-attention K/V as inputs.

The graph takes every attn2 layer's K and V packed side by side, so its inputs do not depend on
how many cross-attention layers the base has (a Triton config fits any base):

    k, v  [batch, tokens, width]   width = Σ_l heads_l · head_dim_l, layers in `kv_layout` order;
                                   layer l's columns are its ``to_k``/``to_v`` output (head-major)

`pack_kv` builds them from `kv.compute_kv`'s ``[rows, heads, tokens, head_dim]`` tensors, once per
batch; `unpack_kv` is the graph's first step. A UNet with added conditions (SDXL's
``addition_embed_type="text_time"``) also takes them as inputs, one row per UNet row:

    text_embeds [batch, pooled width]   the last text encoder's pooled, projected output
    time_ids    [batch, 6]              original size, crop top-left, target size

The layout, the added-condition inputs and the base fingerprint travel in the ONNX file's metadata,
so a graph exported from another base is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from concepts.base import BaseModel
from concepts.errors import BaseMismatch, CorruptArtifact, InvalidArgument

UNET_BACKENDS = ("torch", "onnxruntime")
# Model names in a Triton repository and directories of `customdiff export-onnx`'s output.
UNET, TEXT_ENCODER, TEXT_ENCODER_2, VAE_DECODER = "unet", "text_encoder", "text_encoder_2", "vae_decoder"
# Each graph's one output (the text graphs of a two-encoder base have those below instead).
OUTPUTS = {UNET: "noise_pred", TEXT_ENCODER: "last_hidden_state", VAE_DECODER: "image"}
# The text graphs of a two-encoder base return the penultimate states, the last one its last hidden state too.
PENULTIMATE = "penultimate_hidden_state"
# Added conditions of a ``text_time`` UNet (SDXL), in the graph's input order.
ADDED_CONDITIONS = ("text_embeds", "time_ids")
GRAPH_FILE = "model.onnx"
META_FINGERPRINT = "customdiff.base_fingerprint"
META_LAYOUT = "customdiff.kv_layout"
META_ADDED = "customdiff.added_conditions"

# An exported graph called with named torch tensors, returning its output (a tuple, in the graph's
# order, when it has several).
Run = Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class KVLayer:
    """One cross-attention layer's slice of the packed K/V: ``heads * head_dim`` columns."""

    path: str
    heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.heads < 1 or self.head_dim < 1:
            raise ValueError(f"{self.path}: heads and head_dim must be positive, "
                             f"got {self.heads}, {self.head_dim}")

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def kv_layout(layers: dict[str, nn.Module]) -> tuple[KVLayer, ...]:
    """The packed layout of attn2 modules by path (`kv.install_kv_processors`' result), in their order."""
    return tuple(KVLayer(path, attn.heads, attn.to_k.out_features // attn.heads)
                 for path, attn in layers.items())


def pack_kv(kv: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: tuple[KVLayer, ...],
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer K/V, each [rows, heads, tokens, head_dim] -> packed k, v, each [rows, tokens, width]."""
    packed = []
    for index in (0, 1):
        parts = [kv[layer.path][index].transpose(1, 2).flatten(2) for layer in layout]
        packed.append(torch.cat(parts, dim=-1))
    return packed[0], packed[1]


def unpack_kv(k: torch.Tensor, v: torch.Tensor, layout: tuple[KVLayer, ...],
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of `pack_kv`: k, v [rows, tokens, width] -> path -> (K, V) [rows, heads, tokens, head_dim]."""
    widths = [layer.width for layer in layout]
    rows, tokens = k.shape[0], k.shape[1]
    return {layer.path: tuple(part.reshape(rows, tokens, layer.heads, layer.head_dim).transpose(1, 2)
                              for part in (k_part, v_part))
            for layer, k_part, v_part in zip(layout, k.split(widths, dim=-1), v.split(widths, dim=-1))}


def layout_to_json(layout: tuple[KVLayer, ...]) -> str:
    return json.dumps([[layer.path, layer.heads, layer.head_dim] for layer in layout])


def check_exported_unet(metadata: dict[str, str], fingerprint: str, source: str) -> tuple[KVLayer, ...]:
    """The packed layout recorded in an exported UNet's metadata, once its base is known to be this one.

    Raises:
        CorruptArtifact: the file carries no customdiff metadata (not made by `customdiff export-onnx`).
        BaseMismatch: it was exported from another base.
    """
    if META_FINGERPRINT not in metadata or META_LAYOUT not in metadata:
        raise CorruptArtifact(f"{source}: no {META_LAYOUT} metadata; export the UNet with "
                              "`customdiff export-onnx`")
    if metadata[META_FINGERPRINT] != fingerprint:
        raise BaseMismatch(f"ONNX UNet {source}", expected=fingerprint, actual=metadata[META_FINGERPRINT])
    layers = json.loads(metadata[META_LAYOUT])
    return tuple(KVLayer(path, heads, head_dim) for path, heads, head_dim in layers)


def exported_unet(run: Run, metadata: dict[str, str], fingerprint: str, source: str) -> KVUNet:
    """The runner of an exported UNet whose metadata is `metadata` (`check_exported_unet`'s checks)."""
    layout = check_exported_unet(metadata, fingerprint, source)
    return KVUNet(run, layout, tuple(json.loads(metadata.get(META_ADDED, "[]"))))


def read_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata, without reading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


class KVUNet:
    """The exported UNet as the engine calls it: K/V bound once per batch, then one call per step.

    Args:
        run: the graph (`OrtModel`, or a Triton model called through BLS).
        layout: the graph's packed K/V layout (`check_exported_unet`).
        added: the graph's added-condition inputs (`ADDED_CONDITIONS` for SDXL's UNet, else none).
    """

    def __init__(self, run: Run, layout: tuple[KVLayer, ...], added: tuple[str, ...] = ()) -> None:
        self.run = run
        self.layout = layout
        self.added = added

    def bind(self, kv: dict[str, tuple[torch.Tensor, torch.Tensor]], added: dict[str, torch.Tensor] | None = None,
             ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A step function ``(sample [rows, 4, h, w], timestep [] or [rows]) -> noise [rows, 4, h, w]`` on these
        K/V and added conditions.

        Args:
            kv: layer path -> (K, V), each [rows, heads, tokens, head_dim], one row per UNet row.
            added: the UNet's added conditions by name, one row per UNet row (`Engine.added_conditions`);
                None for a graph without.

        Raises:
            ValueError: `added` names other inputs than the graph's added conditions.
        """
        conditions = dict(added or {})
        if sorted(conditions) != sorted(self.added):
            raise ValueError(f"the exported UNet takes added conditions {list(self.added)}, got {sorted(conditions)}")
        k, v = pack_kv(kv, self.layout)

        def step(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            t = timestep.to(torch.float32).reshape(-1, 1).expand(sample.shape[0], 1).contiguous()
            return self.run({"sample": sample, "timestep": t, "k": k, "v": v, **conditions}).to(sample.dtype)

        return step


_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(int64)": torch.int64}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtModel:
    """An exported graph in an onnxruntime session, called with torch tensors.

    Inputs already of the graph's dtype and on its device are bound in place (I/O binding, no copy);
    the outputs come back through host memory (they are small next to the K/V inputs).

    Thread-safe: each call has its own binding; onnxruntime sessions may run concurrently.

    Args:
        path: the .onnx file.
        device: where the output goes. On CUDA the graph runs on onnxruntime's CUDA provider when
            this onnxruntime has it (onnxruntime-gpu), else on the CPU, with copies both ways.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        import onnxruntime as ort

        self.device = torch.device(device)
        cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        self.run_device = self.device if cuda else torch.device("cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.inputs = {i.name: _TORCH_DTYPES[i.type] for i in self.session.get_inputs()}
        self.outputs = tuple(o.name for o in self.session.get_outputs())
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def output(self) -> str:
        """The name of the graph's only output."""
        (name,) = self.outputs
        return name

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The graph's output for `inputs` (every graph input by name), on `device`; its outputs in order
        when it has several."""
        if set(inputs) != set(self.inputs):
            raise ValueError(f"the graph takes {sorted(self.inputs)}, got {sorted(inputs)}")
        binding, device = self.session.io_binding(), self.run_device
        # onnxruntime reads these by address: they must stay alive until the run returns.
        bound = [tensor.to(device, self.inputs[name]).contiguous() for name, tensor in inputs.items()]
        for name, tensor in zip(inputs, bound):
            binding.bind_input(name, device.type, device.index or 0, _NUMPY_DTYPES[tensor.dtype],
                               tuple(tensor.shape), tensor.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, device.type, device.index or 0)
        if device.type == "cuda":  # torch's kernels are asynchronous; onnxruntime uses its own stream
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)
        outputs = tuple(torch.from_numpy(out).to(self.device) for out in binding.copy_outputs_to_cpu())
        return outputs if len(outputs) > 1 else outputs[0]


def onnx_unet(backend: str, path: str, base: BaseModel) -> KVUNet | None:
    """The engine's UNet runner for config ``unet_backend``/``unet_onnx``: None for torch.

    Args:
        backend: "torch" or "onnxruntime".
        path: the exported UNet (``unet/1/model.onnx``) or the `customdiff export-onnx` directory holding it.
        base: the engine's base; the graph must have been exported from it.

    Raises:
        InvalidArgument: an unknown backend, or no such file.
        BaseMismatch: the graph was exported from another base.
    """
    if backend not in UNET_BACKENDS:
        raise InvalidArgument("unet_backend", f"must be one of {list(UNET_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return None
    file = Path(path) / UNET / "1" / GRAPH_FILE if path and Path(path).is_dir() else Path(path)
    if not path or not file.is_file():
        raise InvalidArgument("unet_onnx", f"the onnxruntime backend needs the exported UNet "
                                           f"(`customdiff export-onnx`), got {path!r}")
    model = OrtModel(file, base.unet.device)
    return exported_unet(model, model.metadata, base.fingerprint, str(file))
