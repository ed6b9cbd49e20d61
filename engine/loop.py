"""Step-level (continuous) batching: requests join and leave the running UNet batch at step boundaries.

`StepLoop` owns the running set. Each admitted request keeps its own scheduler instance (timesteps,
step index, solver history), its cross-attention K/V rows, guidance scale and latents; every step runs
one UNet call per latent size over all running requests of that size, each row with its own request's
timestep (`UNet2DConditionModel` takes a 1-D timestep tensor of batch size). Requests of different
sizes run side by side in the same steps, one UNet call per size (they cannot share a call); the
image budget `max_batch_images` counts all of them.

A request's images do not depend on what else runs: its text and K/V are computed for it alone
at admission, its scheduler steps only its own latents (what `StableDiffusionPipeline` does for it),
it is decoded alone, and the UNet rows are independent (up to the CPU kernels' batch-size dependent
rounding, ~1e-7 per op: see tests/test_engine_loop.py for the bound it keeps).

Admission at each step boundary is FIFO within the budget; a request that does not fit lets younger
ones that do fit go first only until it has waited `max_wait_s`, after which nothing passes it and
the running set drains until it fits (a request larger than the budget runs alone).
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from concepts.errors import CustomDiffError, DeadlineExceeded, Unavailable
from engine.kv import expand_kv, precomputed_kv
from engine.request import GenerationRequest
from engine.schedulers import make_scheduler
from engine.telemetry import spans, tracer
from engine.text import TextConditioning

if TYPE_CHECKING:
    from engine.engine import Engine, _Prepared

KV = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Waiting:
    """A submitted request before admission; `arrived` and `deadline` are `time.monotonic()` seconds.
    `span` is its open span: "engine.queue" until admission, then "engine.denoise" until it leaves."""

    prepared: _Prepared
    future: Future
    arrived: float
    deadline: float | None
    span: Span


@dataclass
class _Running:
    """An admitted request: its own scheduler and latents; UNet rows [uncond x n (with guidance), cond x n]."""

    waiting: _Waiting
    scheduler: object
    latents: torch.Tensor  # [n, 4, h, w]
    kv: KV  # per UNet row of this request
    text: TextConditioning  # per UNet row
    serial: int = 0  # admission order, unique in the loop's life
    step: int = 0
    guided: bool = field(init=False)

    def __post_init__(self) -> None:
        self.guided = self.waiting.prepared.uncond is not None

    @property
    def images(self) -> int:
        return self.latents.shape[0]

    @property
    def done(self) -> bool:
        return self.step >= len(self.scheduler.timesteps)


class StepLoop:
    """The running set of an `Engine` and its admission queue.

    Thread-safe `submit`; `step` runs one step boundary and must be called from one thread at a time:
    the background thread of `start`, or a test stepping the loop by hand (never both).

    Args:
        engine: whose base, cache, prompt encoder and K/V the loop uses.
        max_batch_images: most images running at once (a larger request runs alone).
        max_wait_s: how long a request that does not fit may be overtaken by younger ones that do.
    """

    def __init__(self, engine: Engine, max_batch_images: int, max_wait_s: float = 2.0) -> None:
        self.engine = engine
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.running: list[_Running] = []
        self._waiting: list[_Waiting] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Per latent size: the running requests' ids and their K/V and text rows concatenated (reused
        # while the group is unchanged; it changes only when a request joins or leaves).
        self._rows: dict[tuple[int, ...], tuple[tuple[int, ...], KV, TextConditioning]] = {}
        self._serials = itertools.count()

    def submit(self, request: GenerationRequest, deadline: float | None = None, context: Context | None = None,
               ) -> Future:
        """Queue `request`; its future gets its images ([H, W, 3] float32) or its domain error.

        Concepts are resolved and the prompts tokenized here, in the caller's thread.

        Args:
            deadline: `time.monotonic()` by which it must be done, else it fails with DeadlineExceeded.
            context: the trace its spans hang under (None: the current one).
        """
        future: Future = Future()
        try:
            prepared = self.engine._prepare(request, context)
        except CustomDiffError as e:
            future.set_exception(e)
            return future
        waiting = _Waiting(prepared, future, time.monotonic(), deadline,
                           tracer.start_span("engine.queue", context=prepared.context))
        with self._cond:
            if self._closed:
                _fail(waiting, Unavailable("the engine is shutting down"))
            else:
                self._waiting.append(waiting)
                self._cond.notify()
        return future

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        with self._cond:
            return not self.running and not self._waiting

    def step(self) -> int:
        """One step boundary: drop expired requests, admit, run one denoising step, retire finished ones.

        Returns:
            how many requests are still running.
        """
        now = time.monotonic()
        # 1. Requests whose deadline passed fail now, running or not; the others go on.
        for r in [r for r in self.running if _expired(r.waiting, now)]:
            self.running.remove(r)
            _fail(r.waiting, DeadlineExceeded("generation did not finish within the deadline"))
        # 2. Admit waiting requests within the image budget.
        for waiting in self._admissible(now):
            self._admit(waiting)
        # 3. One UNet call per latent size over its running requests, then each request's scheduler step.
        sizes: dict[tuple[int, ...], list[_Running]] = {}
        for r in self.running:
            sizes.setdefault(tuple(r.latents.shape[1:]), []).append(r)
        self._rows = {size: rows for size, rows in self._rows.items() if size in sizes}
        for group in sizes.values():
            try:
                self._denoise(group)
            except Exception as e:  # a bug: this group's requests fail, the loop and the others go on
                for r in group:
                    self.running.remove(r)
                    _fail(r.waiting, e)
        # 4. Retire the finished ones: decode each alone, hand its images back.
        for r in [r for r in self.running if r.done]:
            self.running.remove(r)
            self._retire(r)
        return len(self.running)

    def run_until_idle(self) -> None:
        """Step until nothing runs or waits (tests, benchmarks; without `start`)."""
        while self.step() or not self.idle:
            pass

    def start(self) -> None:
        """Run the loop in a daemon thread; it sleeps while there is nothing to do."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="customdiff-step-loop", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread after its current step; requests still queued or running fail as Unavailable."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for waiting in [*self._waiting, *(r.waiting for r in self.running)]:
            _fail(waiting, Unavailable("the engine is shutting down"))
        self._waiting, self.running = [], []

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self.running:
                    self._cond.wait()
                if self._closed:
                    return
            self.step()

    def _admissible(self, now: float) -> list[_Waiting]:
        """Take the waiting requests to admit now: FIFO within the budget, with the age bound (module doc)."""
        admitted: list[_Waiting] = []
        used = sum(r.images for r in self.running)
        with self._cond:
            for waiting in list(self._waiting):
                if _expired(waiting, now):
                    self._waiting.remove(waiting)
                    _fail(waiting, DeadlineExceeded("generation did not finish within the deadline"))
                    continue
                n = waiting.prepared.request.num_images
                if used + n <= self.max_batch_images or (used == 0 and not admitted):
                    self._waiting.remove(waiting)
                    admitted.append(waiting)
                    used += n
                elif now - waiting.arrived >= self.max_wait_s:
                    break  # old enough: nothing younger passes it any more
        return admitted

    @torch.inference_mode()
    def _admit(self, waiting: _Waiting) -> None:
        """Text, K/V, initial latents and a fresh scheduler for one request, computed for it alone."""
        engine, p = self.engine, waiting.prepared
        device, request = engine.base.unet.device, p.request
        waiting.span.end()
        engine.observer.queued(time.monotonic() - waiting.arrived)
        waiting.span = tracer.start_span("engine.denoise", context=p.context)
        try:
            with spans("engine.kv", [p.context]):
                text, kv, (cond_row,), (uncond_row,) = engine.encode([p])
            n = request.num_images
            rows = torch.tensor(([uncond_row] * n if uncond_row is not None else []) + [cond_row] * n, device=device)
            latents = engine.initial_latents([request.seed + i for i in range(n)], p.height, p.width,
                                             text.states.dtype)
            scheduler = make_scheduler(engine.base.scheduler, request.scheduler)
            scheduler.set_timesteps(request.num_inference_steps, device=device)
        except Exception as e:
            _fail(waiting, e)
            return
        self.running.append(_Running(waiting, scheduler, latents * scheduler.init_noise_sigma,
                                     expand_kv(kv, rows), text.index_select(rows), next(self._serials)))

    @torch.inference_mode()
    def _denoise(self, group: list[_Running]) -> None:
        """One step of every request in `group` (same latent size): one UNet call, per-row timesteps."""
        unet = self.engine.base.unet
        # 1. Each request's input rows as its pipeline builds them: [uncond, cond] with guidance.
        inputs, timesteps = [], []
        for r in group:
            t = r.scheduler.timesteps[r.step]
            scaled = r.scheduler.scale_model_input(r.latents, t)
            inputs.append(torch.cat([scaled, scaled]) if r.guided else scaled)
            timesteps.append(t.to(torch.float32).expand(inputs[-1].shape[0]))
        model_input, t_rows = torch.cat(inputs), torch.cat(timesteps)
        kv, text = self._group_rows(group)
        self.engine.observer.batch(sum(r.images for r in group),
                                   len({d for r in group for d in r.waiting.prepared.request.concept_digests}))
        # 2. One UNet call over every row.
        runner = self.engine.unet_runner
        if runner is not None:
            first = group[0].waiting.prepared
            noise = runner.bind(kv, self.engine.added_conditions(text, first.height, first.width))(model_input, t_rows)
        else:
            height, width = group[0].waiting.prepared.height, group[0].waiting.prepared.width
            with precomputed_kv(kv):
                noise = unet(model_input, t_rows, encoder_hidden_states=text.states,
                             added_cond_kwargs=self.engine.added_conditions(text, height, width), return_dict=False)[0]
        # 3. Guidance and the scheduler step, per request, exactly as the pipeline does for it.
        start = 0
        for r, rows in zip(group, inputs):
            own = noise[start: start + rows.shape[0]]
            start += rows.shape[0]
            if r.guided:
                uncond, cond = own.chunk(2)
                own = uncond + r.waiting.prepared.request.guidance_scale * (cond - uncond)
            t = r.scheduler.timesteps[r.step]
            r.latents = r.scheduler.step(own, t, r.latents, return_dict=False)[0]
            r.step += 1

    def _group_rows(self, group: list[_Running]) -> tuple[KV, TextConditioning]:
        """The K/V and text rows of `group`, in its order: concatenated when the group changed, else reused."""
        size, ids = tuple(group[0].latents.shape[1:]), tuple(r.serial for r in group)
        cached = self._rows.get(size)
        if cached is None or cached[0] != ids:
            kv = {path: (torch.cat([r.kv[path][0] for r in group]), torch.cat([r.kv[path][1] for r in group]))
                  for path in group[0].kv}
            cached = self._rows[size] = (ids, kv, TextConditioning.cat([r.text for r in group]))
        return cached[1], cached[2]

    @torch.inference_mode()
    def _retire(self, r: _Running) -> None:
        r.waiting.span.end()
        try:
            with spans("engine.decode", [r.waiting.prepared.context]):
                images: np.ndarray = self.engine.decode(r.latents)
        except Exception as e:
            _fail(r.waiting, e)
            return
        self.engine.observer.generated(time.monotonic() - r.waiting.arrived)
        if not r.waiting.future.done():
            r.waiting.future.set_result(list(images))


def _expired(waiting: _Waiting, now: float) -> bool:
    return waiting.deadline is not None and now >= waiting.deadline


def _fail(waiting: _Waiting, error: BaseException) -> None:
    """End the request with `error`, and its open span (ending a span twice changes nothing)."""
    if waiting.span.is_recording():  # not yet ended
        waiting.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        waiting.span.end()
    if not waiting.future.done():
        waiting.future.set_exception(error)
