"""The engine on the exported graphs: UNet, text transformer and VAE decoder elsewhere, concepts here.

Triton's ONNX repository (``deploy/triton/model_repository_onnx``) hosts the three graphs of
`onnx_export.py` on the onnxruntime backend; its Python model "stable_diffusion" runs this engine,
which calls them through BLS. What a concept changes is computed here, per request, in torch: the
prompt's token embeddings (the embedding table and `text.py`'s per-prompt rows) and the
cross-attention K/V (`kv.py`, packed for the graph by `onnx_unet.KVUNet`). The engine code is the
same as with the torch modules; the stand-ins below take the modules' places in the `BaseModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from concepts.base import BaseModel
from concepts.store import ArtifactStore
from engine.engine import Engine
from engine.onnx_unet import (
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    KVUNet,
    Run,
    check_exported_unet,
    read_metadata,
)


class ExportedTextEncoder(nn.Module):
    """Stands in for the CLIP text model: the token-embedding lookup here, the transformer in the graph.

    The lookup stays a torch module so that `text.PromptEncoder`'s hook puts each prompt's own
    modifier-token rows into it, as with the full model.
    """

    def __init__(self, token_embedding: nn.Embedding, run: Run) -> None:
        super().__init__()
        self.token_embedding = token_embedding
        self.run = run

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        """input_ids [rows, 77] -> (last_hidden_state [rows, 77, hidden],), like `CLIPTextModel`."""
        embeds = self.token_embedding(input_ids)
        return (self.run({"inputs_embeds": embeds}).to(embeds.device, embeds.dtype),)


class ExportedVaeDecoder(nn.Module):
    """Stands in for the VAE where the engine uses it: its config and ``decode``."""

    def __init__(self, config, run: Run) -> None:
        super().__init__()
        self.config = config
        self.run = run

    def decode(self, latent_sample: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """latent_sample [rows, 4, h, w], divided by the scaling factor -> (image [rows, 3, 8h, 8w],)."""
        return (self.run({"latent_sample": latent_sample}).to(latent_sample.device, latent_sample.dtype),)


def exported_engine(base: BaseModel, store: ArtifactStore, run_for: Callable[[str], Run],
                    unet_onnx: str | Path, **engine_args) -> Engine:
    """An `Engine` whose UNet, text transformer and VAE decoder are the exported graphs.

    Args:
        base: the base the graphs were exported from; its text encoder and VAE are replaced by the
            stand-ins (the modules are dropped), its UNet keeps serving the cross-attention K/V
            projections and its config.
        store: where concepts are read from.
        run_for: model name ("unet", "text_encoder", "vae_decoder") -> the callable running it.
        unet_onnx: the exported UNet file; only its metadata (fingerprint, K/V layout) is read.
        engine_args: `Engine`'s remaining arguments (cache sizes, max_batch_images).

    Raises:
        BaseMismatch: the UNet was exported from another base.
    """
    layout = check_exported_unet(read_metadata(unet_onnx), base.fingerprint, str(unet_onnx))
    base.text_encoder = ExportedTextEncoder(base.text_encoder.get_input_embeddings(), run_for(TEXT_ENCODER))
    base.vae = ExportedVaeDecoder(base.vae.config, run_for(VAE_DECODER))
    return Engine(base, store, unet_runner=KVUNet(run_for(UNET), layout), **engine_args)
