"""The multi-concept engine: one base pipeline, any mix of concepts in one UNet batch.

Requests whose size, step count and scheduler agree share a UNet batch whatever their concepts;
each sample's concepts act through its own cross-attention K/V (`kv.py`) and its own modifier-token
embeddings (`text.py`). Parity with diffusers is the contract: a request's images equal
`StableDiffusionPipeline` with its concepts installed by `concepts.apply.apply_concepts`, the same
scheduler and ``generator=[torch.Generator().manual_seed(seed + i) for i in range(num_images)]``.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from concepts.apply import check_base
from concepts.artifact import Concept
from concepts.base import BaseModel, load_base
from concepts.errors import CorruptArtifact, CustomDiffError, InvalidArgument
from concepts.store import ArtifactStore
from concepts.tracing import attached
from engine.cache import ConceptCache
from engine.compose import COMPOSE, MergedConcepts, read_captions
from engine.kv import compute_kv, expand_kv, install_kv_processors, precomputed_kv
from engine.loop import StepLoop
from engine.onnx_unet import KVUNet, onnx_unet
from engine.request import GenerationRequest
from engine.schedulers import make_scheduler
from engine.telemetry import EngineObserver, spans, tracer
from engine.text import PromptEncoder, TextConditioning, TokenizedPrompt

log = logging.getLogger(__name__)

BATCHING = ("request", "step")


@dataclass(frozen=True)
class _Prepared:
    """A request resolved against the cache and tokenized: `concepts` and their `weights` are what its K/V
    rows get (its concepts, or their merge at weight 1); `uncond` only with guidance; `context` is the
    trace its spans hang under."""

    request: GenerationRequest
    concepts: tuple[Concept, ...]
    weights: tuple[float, ...]
    cond: TokenizedPrompt
    uncond: TokenizedPrompt | None
    height: int
    width: int
    context: Context | None = None


def to_png(image: np.ndarray) -> bytes:
    """[H, W, 3] floats in [0, 1] -> PNG bytes, quantized as diffusers' `numpy_to_pil` does."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


class Engine:
    """Generates images for batches of `GenerationRequest`s on one base model.

    Thread-safe: concurrent `generate_batch` calls share the (read-only) modules and the cache;
    per-call state lives in ContextVars. On one device they compete for it, so a server runs one
    call at a time per model instance (Triton does) and batches instead.

    Args:
        base: the base model; its UNet's cross-attention processors are replaced (owned from now on).
        store: where concepts are read from, by digest, on their first request.
        cache_bytes: budget of the concept cache on `base`'s device.
        host_cache_bytes: budget of the host-memory tier behind it (ignored on the CPU).
        max_batch_images: most images per UNet batch (a request's images are never split).
        unet_runner: runs the UNet instead of `base.unet` (the exported graph, K/V as inputs: `onnx_unet.py`).
        batching: "request" runs each `generate_batch` call's requests as whole denoising loops, one per
            (size, steps, scheduler); "step" hands them to the step-level loop (`loop.py`), which
            admits and retires requests at every step boundary, whatever their steps or scheduler.
        observer: receives the cache's, the batches' and the requests' metric events (`telemetry.py`).
        compose: how a request's two or more concepts act: "sum" adds each one's (weighted) deltas;
            "merge" serves them, when every weight is 1, as their closed-form merge, made on the set's
            first request and kept (`compose.py`); with any other weight they are summed as with "sum"
            (a merge has no per-concept weight to scale). One concept is served alike by both.
        compose_captions: with "merge", the merges' regularization captions; None: the merger's shipped set.
        compose_context_captions: with "merge", per token, the regularization captions naming its class
            word that also constrain it (`merger.run.merge_concepts`' `context_captions`).
        compose_cache_bytes: with "merge", budget of the kept merges on `base`'s device.

    Raises:
        InvalidArgument: `batching` or `compose` is not a choice, or a compose option is out of range.
    """

    def __init__(self, base: BaseModel, store: ArtifactStore, cache_bytes: int = 1 << 30,
                 host_cache_bytes: int = 0, max_batch_images: int = 16,
                 unet_runner: KVUNet | None = None, batching: str = "request",
                 observer: EngineObserver | None = None, compose: str = "sum",
                 compose_captions: Sequence[str] | None = None, compose_context_captions: int = 0,
                 compose_cache_bytes: int = 256 << 20) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.base = base
        device = base.unet.device
        self.observer = observer or EngineObserver()
        self.cache = ConceptCache(store, self.validate_concept, device=device, dtype=base.unet.dtype,
                                  device_bytes=cache_bytes, host_bytes=0 if device.type == "cpu" else host_cache_bytes,
                                  observer=self.observer)
        if batching not in BATCHING:
            raise InvalidArgument("batching", f"must be one of {list(BATCHING)}, got {batching!r}")
        if compose not in COMPOSE:
            raise InvalidArgument("compose", f"must be one of {list(COMPOSE)}, got {compose!r}")
        self.merged = MergedConcepts(base, compose_captions, compose_context_captions, compose_cache_bytes,
                                     self.observer) if compose == "merge" else None
        self.max_batch_images = max_batch_images
        self.unet_runner = unet_runner
        self.batching = batching
        self._loop: StepLoop | None = None
        self._loop_lock = threading.Lock()
        self.layers = install_kv_processors(base.unet)
        self.prompts = PromptEncoder(base.text_pairs, zero_empty_negative=base.force_zeros_for_empty_prompt)
        self.text_widths = [enc.get_input_embeddings().weight.shape[1] for _, enc in base.text_pairs]
        if base.vae.dtype == torch.float16 and base.vae.config.get("force_upcast", False):
            base.vae.to(torch.float32)  # as the pipelines upcast it to decode: SDXL's fp16 VAE overflows
        self.vae_scale_factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.base_vocab = set(base.tokenizer.get_vocab())
        self.layer_shapes = {f"{path}.{proj}": tuple(getattr(attn, proj).weight.shape)
                             for path, attn in self.layers.items() for proj in ("to_k", "to_v")}

    @classmethod
    def from_paths(cls, base_dir: str | Path, store_url: str, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, cache_bytes: int = 1 << 30, host_cache_bytes: int = 0,
                   max_batch_images: int = 16, unet_backend: str = "torch", unet_onnx: str = "",
                   batching: str = "request", observer: EngineObserver | None = None, compose: str = "sum",
                   compose_captions_file: str = "", compose_context_captions: int = 0,
                   compose_cache_bytes: int = 256 << 20) -> Engine:
        """Load the base from a diffusers directory and serve concepts from the store at `store_url`.

        `unet_backend` "onnxruntime" runs the UNet exported to `unet_onnx` by `customdiff export-onnx`;
        `compose_captions_file` holds the merges' regularization captions, one per line ("": the shipped set).
        """
        captions = read_captions(compose_captions_file)
        base = load_base(base_dir, dtype=dtype, device=device)
        return cls(base, ArtifactStore(store_url), cache_bytes, host_cache_bytes, max_batch_images,
                   unet_runner=onnx_unet(unet_backend, unet_onnx, base), batching=batching, observer=observer,
                   compose=compose, compose_captions=captions, compose_context_captions=compose_context_captions,
                   compose_cache_bytes=compose_cache_bytes)

    def validate_concept(self, digest: str, concept: Concept) -> None:
        """Refuse a concept this base cannot serve (the cache calls this once per load).

        Raises:
            BaseMismatch: made for another base.
            CorruptArtifact: deltas on layers this base lacks, or shapes that differ from them.
            InvalidArgument: a modifier token is already a word of the base vocabulary.
        """
        check_base(concept, self.base.fingerprint, what=f"concept {digest}")
        wrong = [n for n, d in concept.deltas.items() if self.layer_shapes.get(n) != tuple(d.shape)]
        if wrong or [rows.shape[1] for rows in concept.token_rows] != self.text_widths:
            raise CorruptArtifact(f"concept {digest}: deltas or embeddings do not fit this base ({wrong[:3]})")
        clashes = [t for t in concept.tokens if t in self.base_vocab]
        if clashes:
            raise InvalidArgument("concept_digests", f"concept {digest}: tokens {clashes} are base vocabulary words")

    def generate(self, request: GenerationRequest) -> list[np.ndarray]:
        """The request's images, each [H, W, 3] float32 in [0, 1]; raises its domain error."""
        (result,) = self.generate_batch([request])
        if isinstance(result, CustomDiffError):
            raise result
        return result

    def generate_png(self, request: GenerationRequest) -> list[bytes]:
        """The request's images as PNG bytes."""
        return [to_png(image) for image in self.generate(request)]

    def generate_batch(self, requests: list[GenerationRequest], contexts: Sequence[Context | None] | None = None,
                       ) -> list[list[np.ndarray] | CustomDiffError]:
        """Images of every request, or the domain error that request alone failed with.

        Args:
            contexts: per request, the trace its spans hang under (None: the current one).

        Returns:
            one entry per request, in order: its images ([H, W, 3] float32 in [0, 1]) or its error.
        """
        contexts = list(contexts) if contexts is not None else [None] * len(requests)
        if self.batching == "step":
            return [_outcome(f) for f in [self.submit(r, context=c) for r, c in zip(requests, contexts)]]
        started = time.perf_counter()
        # 1. Resolve concepts and tokenize; a failing request fails alone.
        results: list[list[np.ndarray] | CustomDiffError | None] = [None] * len(requests)
        groups: dict[tuple[int, int, int, str], list[tuple[int, _Prepared]]] = {}
        for i, (request, context) in enumerate(zip(requests, contexts)):
            try:
                prepared = self._prepare(request, context)
            except CustomDiffError as e:
                results[i] = e
                continue
            key = (prepared.height, prepared.width, request.num_inference_steps, request.scheduler)
            groups.setdefault(key, []).append((i, prepared))
        # 2. One UNet batch per group (chunked by image count), whatever the concepts.
        for members in groups.values():
            for chunk in self._chunks(members):
                images = self._run([p for _, p in chunk])
                for (i, _), imgs in zip(chunk, images):
                    results[i] = imgs
                    self.observer.generated(time.perf_counter() - started)
        return results

    @property
    def loop(self) -> StepLoop:
        """The step-level loop, started in its background thread on first use."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = StepLoop(self, self.max_batch_images)
                self._loop.start()
            return self._loop

    def submit(self, request: GenerationRequest, deadline: float | None = None, context: Context | None = None,
               ) -> Future:
        """Hand `request` to the running step-level loop (thread-safe, either batching mode).

        Args:
            deadline: `time.monotonic()` by which it must finish, else its future fails with DeadlineExceeded.
            context: the trace its spans hang under (None: the current one).

        Returns:
            a future of its images ([H, W, 3] float32 in [0, 1]) or of its domain error.
        """
        return self.loop.submit(request, deadline, context)

    def close(self) -> None:
        """Stop the step-level loop, if it runs; what it still holds fails as Unavailable."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    def _chunks(self, members: list[tuple[int, _Prepared]]) -> list[list[tuple[int, _Prepared]]]:
        chunks: list[list[tuple[int, _Prepared]]] = [[]]
        count = 0
        for member in members:
            n = member[1].request.num_images
            if chunks[-1] and count + n > self.max_batch_images:
                chunks.append([])
                count = 0
            chunks[-1].append(member)
            count += n
        return chunks

    def _prepare(self, request: GenerationRequest, context: Context | None = None) -> _Prepared:
        with attached(context):
            return self._resolve(request, context)

    def _resolve(self, request: GenerationRequest, context: Context | None) -> _Prepared:
        concepts = tuple(self.cache.get(d) for d in request.concept_digests)
        embeddings: dict[str, tuple[torch.Tensor, ...]] = {}
        owner: dict[str, str] = {}
        for digest, concept in zip(request.concept_digests, concepts):
            for i, token in enumerate(concept.tokens):
                if token.lower() in owner:
                    raise InvalidArgument("concept_digests", f"concepts {owner[token.lower()]} and {digest} "
                                                             f"both define modifier token {token!r}")
                owner[token.lower()] = digest
                embeddings[token] = tuple(rows[i] for rows in concept.token_rows)
        concepts, weights = self._composed(request, concepts)  # after the token check: a merge never renames
        with tracer.start_as_current_span("engine.tokenize"):
            cond = self.prompts.tokenize(request.prompt, embeddings, "prompt")
            uncond = self.prompts.tokenize(request.negative_prompt, embeddings, "negative_prompt") \
                if request.do_guidance else None
        default = self.base.unet.config.sample_size * self.vae_scale_factor
        return _Prepared(request, concepts, weights, cond, uncond, request.height or default,
                         request.width or default, context or otel_context.get_current())

    def _composed(self, request: GenerationRequest, concepts: tuple[Concept, ...],
                  ) -> tuple[tuple[Concept, ...], tuple[float, ...]]:
        """The concepts and weights a request's K/V rows get: with compose "merge", two or more concepts all
        at weight 1 (`concept_weights` empty) become their merge; otherwise the request's own."""
        if self.merged is None or len(concepts) < 2 or request.concept_weights:
            return concepts, request.weights
        return (self.merged.get(request.concept_digests, concepts),), (1.0,)

    def encode(self, batch: list[_Prepared]) -> tuple[TextConditioning, dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                     list[int], list[int | None]]:
        """The text rows of `batch` and their K/V: the one place concepts become K/V, for both batching modes.

        Returns:
            text (states [rows, tokens, hidden], and SDXL's pooled rows); K/V by layer (`compute_kv`);
            per request, its prompt's row and its negative prompt's row (None without guidance).
        """
        texts, row_concepts, cond_row, uncond_row = [], [], [], []
        for p in batch:
            cond_row.append(len(texts))
            texts.append(p.cond)
            row_concepts.append(p.concepts)
            uncond_row.append(len(texts) if p.uncond else None)
            if p.uncond:
                texts.append(p.uncond)
                row_concepts.append(p.concepts)
        text = self.prompts.encode(texts)
        kv = compute_kv(self.layers, text.states, row_concepts,  # each row's concept weights, in the row order above
                        [p.weights for p in batch for _ in range(1 if p.uncond is None else 2)])
        return text, kv, cond_row, uncond_row

    def initial_latents(self, seeds: list[int], height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Noise [len(seeds), C, h, w] on the UNet's device: row i from torch.Generator().manual_seed(seeds[i]),
        drawn on the CPU as the pipeline's per-image generators draw it (the parity contract)."""
        unet = self.base.unet
        shape = (1, unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
                          for seed in seeds]).to(unet.device)

    def added_conditions(self, text: TextConditioning, height: int, width: int) -> dict[str, torch.Tensor] | None:
        """The UNet's `added_cond_kwargs` for `text`'s rows at one size: SDXL's pooled ``text_embeds`` and
        ``time_ids`` (original size, crop top-left, target size: (h, w, 0, 0, h, w) as the pipeline's
        defaults), or None for a UNet without added conditions."""
        if text.pooled is None:
            return None
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=text.states.dtype, device=text.states.device)
        return {"text_embeds": text.pooled, "time_ids": ids.expand(text.states.shape[0], 6)}

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [n, 4, h, w] -> images [n, H, W, 3] float32 in [0, 1], as the pipeline's output_type="np".

        One image at a time (the pipelines' ``enable_vae_slicing``): a 1024 px decode holds ~3 GiB of
        activations, so a batch of 8 would need 24 GiB, and batching gains little at that size.
        """
        vae = self.base.vae
        scaled = (latents / vae.config.scaling_factor).to(vae.dtype)
        images = torch.cat([vae.decode(one, return_dict=False)[0] for one in scaled.split(1)])
        return self.image_processor.postprocess(images, output_type="np")

    @torch.inference_mode()
    def _run(self, batch: list[_Prepared]) -> list[list[np.ndarray]]:
        """One UNet batch: requests agreeing on size, steps and scheduler."""
        unet, device = self.base.unet, self.base.unet.device
        first, contexts = batch[0], [p.context for p in batch]
        # 2.1 Text rows (a prompt, and a negative prompt with guidance, per request) and their K/V.
        with spans("engine.kv", contexts):
            text, kv, cond_row, uncond_row = self.encode(batch)
        # 2.2 Samples: image i of a request starts from torch.Generator().manual_seed(seed + i).
        samples = [(j, p.request.seed + i) for j, p in enumerate(batch) for i in range(p.request.num_images)]
        guided = [s for s, (j, _) in enumerate(samples) if batch[j].uncond is not None]
        # UNet rows as diffusers orders them: the unconditional rows (guided samples), then the conditional.
        rows = [uncond_row[samples[s][0]] for s in guided] + [cond_row[j] for j, _ in samples]
        rows_t = torch.tensor(rows, device=device)
        kv_rows, text_rows = expand_kv(kv, rows_t), text.index_select(rows_t)
        added = self.added_conditions(text_rows, first.height, first.width)
        latents = self.initial_latents([seed for _, seed in samples], first.height, first.width,
                                       text.states.dtype)
        scheduler = make_scheduler(self.base.scheduler, first.request.scheduler)
        scheduler.set_timesteps(first.request.num_inference_steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        guided_t = torch.tensor(guided, device=device, dtype=torch.long)
        scale = torch.tensor([batch[samples[s][0]].request.guidance_scale for s in guided],
                             device=device, dtype=latents.dtype).view(-1, 1, 1, 1)
        # 2.3 Denoising loop; the K/V above serve every step (an exported UNet takes them as inputs).
        step = self.unet_runner.bind(kv_rows, added) if self.unet_runner is not None else None
        concepts = len({d for p in batch for d in p.request.concept_digests})
        with precomputed_kv(kv_rows), spans("engine.denoise", contexts):
            for t in scheduler.timesteps:
                self.observer.batch(len(samples), concepts)
                model_input = scheduler.scale_model_input(torch.cat([latents[guided_t], latents]), t)
                if step is not None:
                    noise = step(model_input, t)
                else:
                    noise = unet(model_input, t, encoder_hidden_states=text_rows.states, added_cond_kwargs=added,
                                 return_dict=False)[0]
                uncond, cond = noise[: len(guided)], noise[len(guided):]
                noise = cond.clone()
                noise[guided_t] = uncond + scale * (cond[guided_t] - uncond)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        # 2.4 Decode, as the pipeline's output_type="np".
        with spans("engine.decode", contexts):
            images = self.decode(latents)
        out, start = [], 0
        for p in batch:
            out.append(list(images[start: start + p.request.num_images]))
            start += p.request.num_images
        return out


def _outcome(future: Future) -> list[np.ndarray] | CustomDiffError:
    """A future's images, or its domain error; any other exception (a bug) is raised."""
    try:
        return future.result()
    except CustomDiffError as e:
        return e
