"""The engine on the exported graphs: UNet, text transformers and VAE decoder elsewhere, concepts here.

Triton's ONNX repository (``deploy/triton/model_repository_onnx``, ``model_repository_onnx_sdxl`` for a
base with two text encoders) hosts the graphs of `onnx_export.py` on the onnxruntime backend; its
Python model "stable_diffusion" runs this engine, which calls them through BLS. What a concept changes
is computed here, per request, in torch: the prompt's token embeddings (the embedding tables and
`text.py`'s per-prompt rows) and the cross-attention K/V (`kv.py`, packed for the graph by
`onnx_unet.KVUNet`). The engine code is the same as with the torch modules; the stand-ins below take
the modules' places in the `BaseModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from concepts.base import BaseModel
from concepts.store import ArtifactStore
from engine.engine import Engine
from engine.onnx_unet import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE_DECODER,
    Run,
    exported_unet,
    read_metadata,
)


@dataclass(frozen=True)
class TextGraphOutput:
    """A two-encoder base's text graph output where the engine reads a transformers CLIP output
    (`text.PromptEncoder.encode`): ``hidden_states[-2]``, the penultimate states (the only hidden states the
    graph returns), and the last encoder's ``last_hidden_state`` (None for the other)."""

    penultimate: torch.Tensor
    last_hidden_state: torch.Tensor | None

    @property
    def hidden_states(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.penultimate, None)


class ExportedTextEncoder(nn.Module):
    """Stands in for the CLIP text model: the token-embedding lookup here, the transformer in the graph.

    The lookup stays a torch module so that `text.PromptEncoder`'s hook puts each prompt's own
    modifier-token rows into it, as with the full model.

    Args:
        config: the text model's config (the engine reads the width of its pooled output).
        penultimate: the graph returns the penultimate states (a base with two text encoders:
            `onnx_export.py`), and the last encoder's its last hidden state too; else only the last hidden state.
        text_projection: the last of two encoders' projection: the engine pools and projects its last
            hidden state here, in torch (`concepts.conditioning`).
    """

    def __init__(self, token_embedding: nn.Embedding, run: Run, config, penultimate: bool = False,
                 text_projection: nn.Module | None = None) -> None:
        super().__init__()
        self.token_embedding = token_embedding
        self.run = run
        self.config = config
        self.penultimate = penultimate
        self.text_projection = text_projection

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False,
                ) -> tuple[torch.Tensor] | TextGraphOutput:
        """input_ids [rows, 77] -> (last_hidden_state [rows, 77, hidden],), like `CLIPTextModel`; with
        `penultimate`, the `TextGraphOutput` (whatever `output_hidden_states`)."""
        embeds = self.token_embedding(input_ids)
        outputs = self.run({"inputs_embeds": embeds})
        outputs = tuple(out.to(embeds.device, embeds.dtype)
                        for out in (outputs if isinstance(outputs, tuple) else (outputs,)))
        if not self.penultimate:
            return outputs
        return TextGraphOutput(outputs[0], outputs[1] if len(outputs) > 1 else None)


class ExportedVaeDecoder(nn.Module):
    """Stands in for the VAE where the engine uses it: its config and ``decode``."""

    def __init__(self, config, run: Run) -> None:
        super().__init__()
        self.config = config
        self.run = run

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the graph's

    def decode(self, latent_sample: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """latent_sample [rows, 4, h, w], divided by the scaling factor -> (image [rows, 3, 8h, 8w],)."""
        return (self.run({"latent_sample": latent_sample}).to(latent_sample.device, latent_sample.dtype),)


def exported_engine(base: BaseModel, store: ArtifactStore, run_for: Callable[[str], Run],
                    unet_onnx: str | Path, **engine_args) -> Engine:
    """An `Engine` whose UNet, text transformers and VAE decoder are the exported graphs.

    Args:
        base: the base the graphs were exported from; its text encoders and VAE are replaced by the
            stand-ins (the modules are dropped), its UNet keeps serving the cross-attention K/V
            projections and its config.
        store: where concepts are read from.
        run_for: model name ("unet", "text_encoder", "text_encoder_2" for a base with two, "vae_decoder")
            -> the callable running it.
        unet_onnx: the exported UNet file; only its metadata (fingerprint, K/V layout) is read.
        engine_args: `Engine`'s remaining arguments (cache sizes, max_batch_images).

    Raises:
        BaseMismatch: the UNet was exported from another base.
    """
    unet = exported_unet(run_for(UNET), read_metadata(unet_onnx), base.fingerprint, str(unet_onnx))
    if base.text_encoder_2 is None:
        base.text_encoder = ExportedTextEncoder(base.text_encoder.get_input_embeddings(), run_for(TEXT_ENCODER),
                                                base.text_encoder.config)
    else:
        base.text_encoder, base.text_encoder_2 = (
            ExportedTextEncoder(encoder.get_input_embeddings(), run_for(name), encoder.config, penultimate=True,
                                text_projection=encoder.text_projection if name == TEXT_ENCODER_2 else None)
            for name, encoder in ((TEXT_ENCODER, base.text_encoder), (TEXT_ENCODER_2, base.text_encoder_2)))
    base.vae = ExportedVaeDecoder(base.vae.config, run_for(VAE_DECODER))
    return Engine(base, store, unet_runner=unet, **engine_args)
