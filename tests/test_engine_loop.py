"""The step-level loop (`engine/loop.py`): parity with diffusers, and images independent of who else runs."""

from __future__ import annotations

import time

import pytest

from concepts.base import load_base
from concepts.errors import DeadlineExceeded, InvalidArgument
from engine.engine import Engine
from engine.schedulers import make_scheduler
from engine.loop import StepLoop
from engine.request import GenerationRequest
from tests.conftest import random_concept
from tests.test_inference_engine import PROMPT, SCHEDULERS, diffusers_images, max_diff

STEPS = 4


@pytest.fixture(scope="module")
def d(store, tiny_base_dir) -> dict[str, str]:
    base = load_base(tiny_base_dir)
    return {"a": store.put_concept(random_concept(base, 1, "<new1>", rank=2)),
            "b": store.put_concept(random_concept(base, 2, "<new2>"))}


@pytest.fixture(scope="module")
def engine(tiny_base_dir, store) -> Engine:
    return Engine(load_base(tiny_base_dir), store, max_batch_images=16)


def alone(engine: Engine, request: GenerationRequest) -> list:
    """The request's images when it is the only one in a fresh loop."""
    loop = StepLoop(engine, engine.max_batch_images)
    future = loop.submit(request)
    loop.run_until_idle()
    return future.result()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_parity_with_diffusers_for_every_scheduler(engine, store, d, tiny_base_dir, scheduler):
    request = GenerationRequest(PROMPT, "blurry", concept_digests=(d["a"],), num_images=2, num_inference_steps=STEPS,
                                seed=7, scheduler=scheduler)
    ours = alone(engine, request)
    assert max_diff(ours, diffusers_images(tiny_base_dir, store, request)) < 1e-4
    assert max_diff(ours, engine.generate_batch([request])[0]) < 1e-5  # the request-level path


def test_a_request_joining_at_step_17_gets_the_images_it_gets_alone(engine, d):
    first = GenerationRequest(PROMPT, concept_digests=(d["a"],), num_inference_steps=50, seed=1, height=32, width=32)
    joiner = GenerationRequest("a <new2> cat", "blurry", concept_digests=(d["b"],), num_images=2,
                               num_inference_steps=20, seed=2, height=32, width=32, scheduler="dpm_solver_multistep",
                               guidance_scale=5.0)
    rows: list[int] = []
    hook = engine.base.unet.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    try:
        loop = StepLoop(engine, 16)
        a = loop.submit(first)
        for _ in range(17):
            loop.step()
        assert loop.running[0].step == 17
        b = loop.submit(joiner)  # admitted at the next step boundary: A's step 18, B's step 1
        loop.run_until_idle()
    finally:
        hook.remove()
    # One UNet call a step over both while both run: 2 rows of A, 4 of B (2 images, guidance).
    scheduler = make_scheduler(engine.base.scheduler, "")
    scheduler.set_timesteps(50)  # the base's PNDM: 51 UNet calls for 50 steps
    assert rows == [2] * 17 + [6] * 20 + [2] * (len(scheduler.timesteps) - 37)
    assert max_diff(a.result(), alone(engine, first)) <= 1e-5
    assert max_diff(b.result(), alone(engine, joiner)) <= 1e-5


def test_mixed_steps_schedulers_and_sizes_share_the_loop(engine, d):
    requests = [
        GenerationRequest(PROMPT, concept_digests=(d["a"],), num_inference_steps=6, seed=1, scheduler="euler"),
        GenerationRequest("a <new2> cat", concept_digests=(d["b"],), num_inference_steps=3, seed=2, scheduler="ddim",
                          guidance_scale=1.0, num_images=2),
        GenerationRequest(PROMPT, concept_digests=(d["a"], d["b"]), num_inference_steps=5, seed=3, height=32,
                          width=48),
        GenerationRequest("a dog", num_inference_steps=4, seed=4),
    ]
    loop = StepLoop(engine, 16)
    futures = [loop.submit(r) for r in requests]
    loop.run_until_idle()
    for request, future in zip(requests, futures):
        assert max_diff(future.result(), alone(engine, request)) <= 1e-5


def test_budget_fifo_and_age_bound(engine):
    loop = StepLoop(engine, 4, max_wait_s=60.0)
    small = [GenerationRequest("a dog", num_inference_steps=3, seed=i, height=32, width=32) for i in range(3)]
    big = GenerationRequest("a cat", num_inference_steps=3, num_images=3, height=32, width=32)
    first = loop.submit(small[0])
    loop.step()
    loop.submit(big)  # 1 + 3 fits
    later = loop.submit(small[1])  # 5 > 4: waits
    loop.step()
    assert [r.images for r in loop.running] == [1, 3]
    loop.run_until_idle()
    assert first.done() and later.done()
    # A request that does not fit is passed by younger ones that do, until it is max_wait_s old.
    loop = StepLoop(engine, 4, max_wait_s=0.0)
    loop.submit(small[0])
    loop.submit(small[1])
    loop.step()
    loop.submit(big)  # 2 + 3 > 4, and already too old to be passed
    young = loop.submit(small[2])
    loop.step()
    assert [r.images for r in loop.running] == [1, 1]  # `young` did not pass `big`
    loop.run_until_idle()
    assert young.done()


def test_deadlines_fail_alone_and_bad_requests_fail_at_submit(engine):
    loop = StepLoop(engine, 16)
    doomed = loop.submit(GenerationRequest("a dog", num_inference_steps=50, height=32, width=32),
                         deadline=time.monotonic() + 0.5)
    fine = loop.submit(GenerationRequest("a cat", num_inference_steps=3, height=32, width=32))
    expired = loop.submit(GenerationRequest("a cow", num_inference_steps=3), deadline=time.monotonic() - 1)
    bad = loop.submit(GenerationRequest("dog " * 80, num_inference_steps=3))
    assert isinstance(bad.exception(), InvalidArgument)
    loop.step()
    time.sleep(0.6)
    loop.run_until_idle()
    assert len(fine.result()) == 1
    assert isinstance(doomed.exception(), DeadlineExceeded) and isinstance(expired.exception(), DeadlineExceeded)


def test_engine_step_batching_runs_the_loop_in_a_thread(tiny_base_dir, store, d):
    engine = Engine(load_base(tiny_base_dir), store, batching="step")
    try:
        requests = [GenerationRequest(PROMPT, concept_digests=(d["a"],), num_inference_steps=STEPS, seed=1),
                    GenerationRequest("dog " * 80, num_inference_steps=STEPS)]
        images, error = engine.generate_batch(requests)
        assert isinstance(error, InvalidArgument)
        assert max_diff(images, Engine(load_base(tiny_base_dir), store).generate(requests[0])) <= 1e-5
        late = engine.submit(requests[0])  # the thread picks up work after going idle
        assert max_diff(late.result(timeout=60), images) <= 1e-5
    finally:
        engine.close()
    with pytest.raises(InvalidArgument):
        Engine(load_base(tiny_base_dir), store, batching="token")
