"""One training job from spec to artifact: check, load, class images, encode, train, checkpoint, store."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from concepts.artifact import Concept, LinearDelta, concept_to_bytes
from concepts.base import BaseModel, load_base
from concepts.store import ArtifactStore
from trainer.batches import BatchMaker, EncodedExamples, encode_examples
from trainer.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from trainer.class_images import class_images_for
from trainer.data import class_examples, instance_examples, load_image
from trainer.distributed import DistContext, init_distributed
from trainer.loop import TrainState, batch_plan, learning_rate, make_optimizer, train_step, wrap_distributed
from trainer.model import TOKEN_PARAM, TOKEN_PARAM_2, autocast, encode_text, prepare_model
from trainer.progress import ProgressLog, StepTimer, read_result, write_result
from trainer.spec import JobSpec, check_inputs
from trainer.tokens import TokenRows, add_modifier_tokens


@dataclass
class JobResult:
    """What a finished (or stopped) job leaves: the digest in the store, the concept, the trained modules."""

    digest: str | None
    concept: Concept | None
    base: BaseModel | None
    step: int


def tokenize(tokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    """[len(captions), model_max_length] padded token ids."""
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids.to(device)


def tokenize_pairs(base: BaseModel, captions: list[str], device: torch.device) -> torch.Tensor:
    """[len(captions), E, model_max_length] padded token ids of each of the base's E tokenizers."""
    return torch.stack([tokenize(tokenizer, captions, device) for tokenizer, _ in base.text_pairs], dim=1)


def _encode_data(spec: JobSpec, base: BaseModel, class_lists: list[list[tuple[Path, str]]],
                 ctx: DistContext) -> tuple[EncodedExamples, EncodedExamples | None]:
    """Target views and class images through the VAE, once."""
    hp = spec.hyperparameters
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    views = hp.views_per_image if (hp.augment or hp.hflip) else 1
    targets = [(load_image(p), c.instance_caption()) for c in spec.concepts for p in c.images]
    instance = encode_examples(base.vae, instance_examples(targets, hp.resolution, factor, views, hp.seed,
                                                           hp.augment, hp.hflip), views, ctx.device)
    if not hp.with_prior_preservation:
        return instance, None
    pairs = [(load_image(p), caption) for pairs in class_lists for p, caption in pairs]
    classes = encode_examples(base.vae, class_examples(pairs, hp.resolution, factor, hp.hflip),
                              2 if hp.hflip else 1, ctx.device)
    return instance, classes


def build_state(spec: JobSpec, base: BaseModel, class_lists: list[list[tuple[Path, str]]], ctx: DistContext,
                progress: ProgressLog) -> tuple[TrainState, list[TokenRows], dict[str, torch.Tensor]]:
    """Tokens, trainable model, latents, batches and optimizer for `base` (modified in place).

    Args:
        class_lists: per concept, the (image path, caption) regularization pairs; empty without prior preservation.

    Returns:
        The state `train_step` takes, the token rows of each text encoder, and the original float32
        weights of the trained layers.
    """
    from diffusers import DDPMScheduler

    hp = spec.hyperparameters
    token_rows = []
    for tokenizer, text_encoder in base.text_pairs:  # every text encoder learns its own rows of the tokens
        token_ids, rows = add_modifier_tokens(tokenizer, text_encoder, [c.modifier_token for c in spec.concepts],
                                              [c.initializer_token for c in spec.concepts])
        token_rows.append(TokenRows(text_encoder.get_input_embeddings(), token_ids, rows))
    model, params, originals = prepare_model(base, token_rows[0], hp.mixed_precision, ctx.device,
                                             hp.gradient_checkpointing, token_rows[1] if len(token_rows) > 1 else None)
    progress.state("encoding latents", "target views and class images through the VAE, once per job")
    instance, classes = _encode_data(spec, base, class_lists, ctx)
    class_states = class_pooled = None
    if classes is not None:
        with torch.no_grad(), autocast(ctx.device, hp.mixed_precision):
            class_states, class_pooled = encode_text([e for _, e in base.text_pairs],
                                                     tokenize_pairs(base, classes.captions, ctx.device),
                                                     base.text_pairs[-1][0].eos_token_id)
    batch, accumulation = batch_plan(hp.effective_batch_size, ctx.world_size, hp.train_batch_size,
                                     hp.gradient_accumulation_steps)
    batches = BatchMaker(instance, tokenize_pairs(base, instance.captions, ctx.device), classes, class_states,
                         seed=hp.seed, global_batch=batch * ctx.world_size, rank=ctx.rank,
                         world_size=ctx.world_size, scaling_factor=base.vae.config.scaling_factor,
                         num_train_timesteps=base.scheduler.config.num_train_timesteps, class_pooled=class_pooled)
    lr = learning_rate(hp.learning_rate, batch, ctx.world_size, accumulation, hp.with_prior_preservation, hp.scale_lr)
    state = TrainState(
        model=wrap_distributed(model, ctx), params=params,
        optimizer=make_optimizer(params, lr, hp.weight_decay, ctx.device),
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=hp.mixed_precision == "fp16"),
        batches=batches, noise_scheduler=DDPMScheduler.from_config(base.scheduler.config), ctx=ctx,
        precision=hp.mixed_precision, accumulation=accumulation,
        max_grad_norm=hp.max_grad_norm, prior_loss_weight=hp.prior_loss_weight if hp.with_prior_preservation else 0.0,
    )
    return state, token_rows, originals


def job_key(spec: JobSpec, fingerprint: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed: everything that changes the trajectory."""
    d = spec.to_dict()
    hp = {k: v for k, v in d["hyperparameters"].items() if k != "checkpointing_steps"}
    blob = json.dumps({"hp": hp, "concepts": d["concepts"], "base": fingerprint, "world": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _train(spec: JobSpec, state: TrainState, key: str, progress: ProgressLog) -> int:
    """Run from the checkpoint (if any) to the end or to `stop_after_steps`; return the last step done."""
    hp = spec.hyperparameters
    total = hp.max_train_steps
    stop = spec.stop_after_steps or total
    start = load_checkpoint(spec.work_dir, key, state.params, state.optimizer, state.scaler)
    steps = f"steps {start + 1} to {stop} of {total}" if start < stop else "already trained"
    progress.state("training", f"resumed from the checkpoint at step {start}; {steps}" if start else steps)
    per_step = state.batches.global_batch * state.accumulation
    timer = StepTimer(per_step * (2 if hp.with_prior_preservation else 1))
    lr = state.optimizer.param_groups[0]["lr"]
    for step in range(start, stop):
        loss = train_step(state, step)
        timer.tick()
        images_per_s, steps_per_s, eta = timer.rates(total - step - 1)
        progress.progress(step + 1, total, loss, lr, images_per_s, steps_per_s, eta)
        done = step + 1
        if state.ctx.is_main and (done == stop < total or (done % hp.checkpointing_steps == 0 and done < total)):
            save_checkpoint(spec.work_dir, done, key, state.params, state.optimizer, state.scaler)
    return max(start, stop)


def _store_concept(spec: JobSpec, base: BaseModel, state: TrainState, originals: dict[str, torch.Tensor],
                   steps: int) -> tuple[Concept, str, int]:
    modules = dict(base.unet.named_modules())
    deltas = {name: LinearDelta(dense=(modules[name].weight.detach().float().cpu() - w0).contiguous())
              for name, w0 in originals.items()}
    rows = {name: state.params[name].detach().float().cpu().clone()
            for name in (TOKEN_PARAM, TOKEN_PARAM_2) if name in state.params}
    concept = Concept(
        deltas=deltas,
        tokens=tuple(c.modifier_token for c in spec.concepts),
        embeddings=rows[TOKEN_PARAM],
        embeddings_2=rows.get(TOKEN_PARAM_2),
        family=base.family,
        base_fingerprint=base.fingerprint,
        class_words=tuple(c.class_prompt for c in spec.concepts),
        provenance={**spec.provenance, "kind": "training", "steps": steps, "world_size": state.ctx.world_size,
                    "hyperparameters": spec.to_dict()["hyperparameters"], "concept_name": spec.concept_name,
                    "concepts": [{"name": c.name, "class_prompt": c.class_prompt,
                                  "instance_prompt": c.instance_caption(), "modifier_token": c.modifier_token,
                                  "initializer_token": c.initializer_token, "images": len(c.images)}
                                 for c in spec.concepts]},
    )
    data = concept_to_bytes(concept)
    return concept, ArtifactStore(spec.store_url).put(data), len(data)


def run_job(spec: JobSpec, echo: bool = False, listener: Callable[[dict], None] | None = None,
            bars: bool = False) -> JobResult:
    """Run the job; rank 0 stores the artifact and writes ``result.json``. See docs/job-spec.md.

    Args:
        echo: also print each progress line on stdout (rank 0), as `python -m trainer` does.
        listener: called with each event on rank 0 (the CLI's progress bar).
        bars: show tqdm bars for the phases without step events (class-image generation);
            rank 0 only, on a terminal only (`concepts.progress`).

    Raises:
        InvalidArgument: bad inputs, before any compute.
    """
    spec = check_inputs(spec)  # fills in what depends on the base (the default resolution)
    ctx = init_distributed(spec.device)
    progress = ProgressLog(spec.work_dir, enabled=ctx.is_main, echo=echo, listener=listener)
    previous = read_result(spec.work_dir)
    if previous and ArtifactStore(spec.store_url).exists(previous["digest"]):
        progress.done(previous["digest"])
        return JobResult(previous["digest"], None, None, spec.hyperparameters.max_train_steps)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    progress.state("loading base model", spec.base_model)
    base = load_base(spec.base_model, device=str(ctx.device))
    hp = spec.hyperparameters
    class_lists = ([class_images_for(spec, c, base, ctx, progress, bar=bars) for c in spec.concepts]
                   if hp.with_prior_preservation else [])
    state, token_rows, originals = build_state(spec, base, class_lists, ctx, progress)
    step = _train(spec, state, job_key(spec, base.fingerprint, ctx.world_size), progress)
    if step < hp.max_train_steps:
        progress.state("stopped", f"checkpoint at step {step} of {hp.max_train_steps}; run again to resume")
        return JobResult(None, None, base, step)
    for rows in token_rows:
        rows.detach_from_embedding()
    digest = None
    concept = None
    if ctx.is_main:
        progress.state("saving artifact", spec.store_url)
        concept, digest, size = _store_concept(spec, base, state, originals, step)
        write_result(spec.work_dir, {"digest": digest, "tokens": list(concept.tokens),
                                     "class_words": list(concept.class_words), "bytes": size})
        remove_checkpoint(spec.work_dir)
        progress.done(digest)
    ctx.barrier()
    return JobResult(digest, concept, base, step)
