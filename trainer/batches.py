"""Latents encoded once per job, and the batches drawn from them.

Every draw (which example, which view, the VAE sample, the noise, the timestep) is a function of
(seed, step, micro-batch) and is made for the whole global batch on every rank, which then keeps
its own slice. So N processes with batch b see exactly the samples one process with batch N*b sees,
and a job resumed at step k draws what an uninterrupted one draws at step k.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trainer.data import Example

ENCODE_BATCH = 8


@dataclass
class EncodedExamples:
    """Examples after the VAE, on the training device.

    Args:
        mean, std: [N, 4, h, w] float32 parameters of the VAE's latent distribution (unscaled).
        mask: [N, 1, h, w] float32 loss mask.
        caption_index: [N] long, index into `captions`.
        captions: distinct captions.
        per_source: views per source image; example ``i * per_source + k`` is view k of image i.
        time_ids: [N, 6] float32 SDXL size and crop conditioning (`trainer.data.Example.time_ids`).
    """

    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor
    caption_index: torch.Tensor
    captions: list[str]
    per_source: int
    time_ids: torch.Tensor | None = None

    @property
    def num_sources(self) -> int:
        return self.mean.shape[0] // self.per_source


@torch.no_grad()
def encode_examples(vae: nn.Module, examples: Iterable[Example], per_source: int,
                    device: torch.device) -> EncodedExamples:
    """Run the VAE encoder over all examples, `ENCODE_BATCH` at a time; keep mean and std, not a sample."""
    means, stds, masks, caption_index, captions, time_ids = [], [], [], [], {}, []
    chunk: list[Example] = []

    def flush() -> None:
        pixels = torch.from_numpy(np.stack([e.pixels for e in chunk])).to(device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
        chunk.clear()

    for example in examples:
        chunk.append(example)
        masks.append(torch.from_numpy(example.mask))
        time_ids.append(example.time_ids)
        caption_index.append(captions.setdefault(example.caption, len(captions)))
        if len(chunk) == ENCODE_BATCH:
            flush()
    if chunk:
        flush()
    return EncodedExamples(
        mean=torch.cat(means), std=torch.cat(stds), mask=torch.stack(masks)[:, None].to(device),
        caption_index=torch.tensor(caption_index, device=device), captions=list(captions), per_source=per_source,
        time_ids=torch.tensor(time_ids, dtype=torch.float32, device=device),
    )


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from a hash of `parts` (CPU, so every device type draws the same numbers)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class Batch:
    """One rank's micro-batch: B instance examples, then C (= B or 0) class examples.

    Args:
        latents, noise: [B + C, 4, h, w] scaled latents and the noise to add.
        timesteps: [B + C] long.
        instance_ids: [B, E, L] token ids of the instance captions, per text encoder.
        class_states: [C, L, hidden] text conditioning of the class captions (`trainer.model.encode_text`),
            or None.
        mask: [B, 1, h, w] loss mask of the instance examples.
        class_pooled: [C, pooled] pooled text of the class captions (SDXL), else None.
        time_ids: [B + C, 6] SDXL size and crop conditioning of each example, when the examples have it.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    instance_ids: torch.Tensor
    class_states: torch.Tensor | None
    mask: torch.Tensor
    class_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


class BatchMaker:
    """Draws the batches of a job. The order follows the reference: an epoch is a random permutation of
    max(#target images, #class images) indices; index i pairs target image i mod #targets with class
    image i mod #classes.

    Args:
        instance_ids: [captions, E, L] token ids of `instance.captions` per text encoder.
        class_states, class_pooled: the text conditioning of `classes.captions`, row per caption.
    """

    def __init__(self, instance: EncodedExamples, instance_ids: torch.Tensor, classes: EncodedExamples | None,
                 class_states: torch.Tensor | None, *, seed: int, global_batch: int, rank: int, world_size: int,
                 scaling_factor: float, num_train_timesteps: int, class_pooled: torch.Tensor | None = None) -> None:
        self.instance, self.instance_ids = instance, instance_ids
        self.classes, self.class_states, self.class_pooled = classes, class_states, class_pooled
        self.seed, self.global_batch = seed, global_batch
        self.rank, self.world_size = rank, world_size
        self.scaling_factor = scaling_factor
        self.num_train_timesteps = num_train_timesteps
        self.length = max(instance.num_sources, classes.num_sources if classes else 0)
        self._orders: dict[int, torch.Tensor] = {}

    def _indices(self, first: int) -> torch.Tensor:
        out = []
        for position in range(first, first + self.global_batch):
            epoch = position // self.length
            if epoch not in self._orders:  # keep one epoch's order: positions only move forward
                g = seeded_generator(self.seed, "epoch", epoch)
                self._orders = {epoch: torch.randperm(self.length, generator=g)}
            out.append(int(self._orders[epoch][position % self.length]))
        return torch.tensor(out)

    def _sample(self, enc: EncodedExamples, sources: torch.Tensor,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick a view of each source and draw its latent; returns (example indices, scaled latents)."""
        views = torch.randint(enc.per_source, (len(sources),), generator=g)
        index = ((sources % enc.num_sources) * enc.per_source + views).to(enc.mean.device)
        eps = torch.randn((len(sources),) + tuple(enc.mean.shape[1:]), generator=g).to(enc.mean.device)
        return index, (enc.mean[index] + enc.std[index] * eps) * self.scaling_factor

    def make(self, micro_index: int) -> Batch:
        """The rank's slice of global micro-batch `micro_index` (counted over the whole job)."""
        g = seeded_generator(self.seed, "batch", micro_index)
        sources = self._indices(micro_index * self.global_batch)
        index, latents = self._sample(self.instance, sources, g)
        groups = [(index, latents)]
        if self.classes is not None:
            groups.append(self._sample(self.classes, sources, g))
        n = sum(len(i) for i, _ in groups)
        noise = torch.randn((n,) + tuple(latents.shape[1:]), generator=g).to(latents.device)
        timesteps = torch.randint(self.num_train_timesteps, (n,), generator=g).to(latents.device)
        local = self.global_batch // self.world_size
        lo, hi = self.rank * local, (self.rank + 1) * local
        rows = [torch.arange(lo, hi) + k * self.global_batch for k in range(len(groups))]
        sel = torch.cat(rows).to(latents.device)
        inst_index = index[lo:hi]
        class_states = class_pooled = None
        examples = [(self.instance, inst_index)]
        if self.classes is not None:
            class_index = groups[1][0][lo:hi]
            examples.append((self.classes, class_index))
            captions = self.classes.caption_index[class_index]
            class_states = self.class_states[captions]
            class_pooled = None if self.class_pooled is None else self.class_pooled[captions]
        time_ids = None
        if all(enc.time_ids is not None for enc, _ in examples):
            time_ids = torch.cat([enc.time_ids[i] for enc, i in examples])
        return Batch(
            latents=torch.cat([lat for _, lat in groups])[sel], noise=noise[sel], timesteps=timesteps[sel],
            instance_ids=self.instance_ids[self.instance.caption_index[inst_index]],
            class_states=class_states, mask=self.instance.mask[inst_index], class_pooled=class_pooled,
            time_ids=time_ids,
        )
