"""The toy world: renderer, held-out concepts, the ground-truth metric, the committed base, eval wiring."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from evals.toyworld.metrics import attribute_accuracy, image_outcome, parse_image, parse_images, text_hit
from evals.toyworld.render import render, render_batch
from evals.toyworld.world import (
    CONCEPTS,
    COLOURS,
    Look,
    Scene,
    all_scenes,
    is_held_out,
    pretraining_scenes,
    vocabulary,
)

RING, SQUARE = CONCEPTS


def test_renders_are_deterministic_and_every_scene_differs():
    scenes = all_scenes()
    first = render_batch(scenes)
    assert first.shape == (7200, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first[::37], render_batch(scenes[::37]))
    assert len({hashlib.sha256(im.tobytes()).hexdigest() for im in first}) == 7200


def test_concept_render_has_its_parts_where_the_look_says():
    image = render(RING.scene("large", "navy"))
    assert tuple(image[12, 32]) == COLOURS["orange"]  # top half of the ring
    assert tuple(image[52, 32]) == COLOURS["cyan"]  # bottom half
    assert tuple(image[32, 32]) == tuple(image[1, 1]) == (20, 30, 100)  # the hole and the border: navy
    stripes = render(SQUARE.scene("large", "white"))
    assert tuple(stripes[34, 32]) == COLOURS["yellow"] and tuple(stripes[30, 32]) == COLOURS["blue"]


def test_concepts_are_held_out_but_their_class_and_look_are_not():
    pretrained = pretraining_scenes()
    assert len(pretrained) == 7200 - 2 * 2 * 2 * 6  # two concepts, both colour orders, 2 sizes, 6 backgrounds
    assert not any(is_held_out(s) for s in pretrained)
    for concept in CONCEPTS:
        assert not any(s.cls == concept.cls and s.look == concept.look for s in pretrained)
        assert sum(s.cls == concept.cls for s in pretrained) == 1440 - 24
        assert sum(s.look == concept.look for s in pretrained) == 4 * 12  # the look on the other four classes
    assert {"ring", "square", "two", "tone", "striped", "ktn", "pll"} <= set(vocabulary())


def test_every_rendered_scene_parses_back_to_itself():
    scenes = all_scenes()[::11]  # 655 scenes: every class, size, pattern and background
    parses = parse_images(render_batch(scenes))
    assert [p.scene for p in parses] == scenes


@pytest.mark.parametrize("radius", [6, 8])
def test_a_blurred_concept_is_unrecognized_not_a_hit(radius):
    for concept in CONCEPTS:
        for size in ("small", "large"):
            blob = np.asarray(Image.fromarray(render(concept.scene(size, "gray"))).filter(ImageFilter.GaussianBlur(radius)))
            parse = parse_image(blob)
            assert image_outcome(parse, concept) == "unrecognized", (concept.name, size, parse)
            assert not text_hit(parse, concept.cls, "gray")


def test_a_disc_in_the_ring_colours_is_a_circle_not_the_ring():
    disc = render(Scene("circle", "large", RING.look, "olive"))
    parse = parse_image(disc)
    assert parse.recognized and parse.scene.cls == "circle"
    assert image_outcome(parse, RING) == "miss"
    assert not text_hit(parse, "ring", "olive")


def test_noise_and_a_foreign_background_are_unrecognized():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    green = render(RING.scene("large", "white"))
    green[(green == 245).all(axis=2)] = (255, 0, 255)  # white -> a colour no background has
    assert [p.reason for p in parse_images(np.concatenate([noise, green[None]]))] == [
        "the border matches no background colour"] * 3


def test_image_and_text_outcomes():
    other_look = render(Scene("ring", "small", Look("solid", ("red",)), "navy"))
    parse = parse_image(other_look)
    assert image_outcome(parse, RING) == "miss"
    assert text_hit(parse, "ring", "navy", "small") and text_hit(parse, "ring", "navy")
    assert not text_hit(parse, "ring", "navy", "large") and not text_hit(parse, "ring", "brown")
    hit = parse_image(render(RING.scene("small", "brown")))
    assert image_outcome(hit, RING) == "hit" and image_outcome(hit, SQUARE) == "miss"


def test_eval_wiring_on_the_tiny_base(tiny_base, tmp_path):
    """Variants, engine sampling, scoring, the JSON summary and the sheet, with random stand-in concepts
    (training goes through `customdiff train`, tested with the trainer)."""
    from concepts.store import ArtifactStore
    from evals.toyworld import eval as toy
    from engine.engine import Engine
    from tests.conftest import random_concept

    store = ArtifactStore(str(tmp_path / "store"))
    singles = {c.token: store.put_concept(random_concept(tiny_base, i, c.token, class_word=c.cls))
               for i, c in enumerate(CONCEPTS)}
    joint = toy.variants.average_concepts([store.get_concept(d) for d in singles.values()])
    digests, sizes = toy.derive_variants(tiny_base, store, singles, store.put_concept(joint))
    jobs = toy.make_jobs(digests)
    assert len(jobs) == len(toy.ROWS) * 2 * 6 and {j.prompt for j in jobs if j.variant == "base"} >= {
        "a large ring on a navy background", "a small square on a brown background"}
    images = toy.sample(Engine(tiny_base, store, max_batch_images=64), jobs, toy.EvalConfig(seeds=1, steps=2))
    assert images.shape == (108, 1, 64, 64, 3) and images.dtype == np.uint8
    summary = toy.summarize(toy.score(jobs, images), sizes)
    assert list(summary) == list(toy.ROWS)
    assert all(0.0 <= v["text"] <= 1.0 and 0.0 <= v["image"] <= 1.0 for v in summary.values())
    bytes_ = {k: v["bytes"] for k, v in summary.items()}
    assert bytes_["base"] == 0 and bytes_["rank1"] < bytes_["top10"] < bytes_["top60"] < bytes_["single"]
    assert min(bytes_["merge"], bytes_["average"]) > bytes_["single"]  # two tokens, same layers
    sheet = Image.open(toy.write_sheet(jobs, images, tmp_path / "sheet.png"))
    assert sheet.size == (toy.LABEL_WIDTH + 12 * 66 + 2, 9 * 66 + 2)


def test_the_committed_base_draws_what_it_is_told():
    """The pretrained base (evals/toyworld/base) follows fully described prompts of the world."""
    from evals.toyworld.sampling import generate, load_pipeline

    scenes = [Scene(c, s, Look("solid", (colour,)), bg) for c, s, colour, bg in
              (("circle", "large", "red", "navy"), ("square", "small", "yellow", "brown"),
               ("triangle", "large", "blue", "white"), ("frame", "large", "green", "gray"),
               ("ring", "large", "pink", "olive"), ("square", "large", "cyan", "black"))]
    scenes += [Scene("circle", "large", Look("two tone", ("purple", "yellow")), "gray"),
               Scene("frame", "large", Look("striped", ("orange", "green")), "navy")]
    images = generate(load_pipeline(), [s.caption() for s in scenes] * 2, list(range(2 * len(scenes))))
    accuracy = attribute_accuracy(parse_images(images), scenes * 2)
    assert accuracy["background"] >= 0.6 and accuracy["class"] >= 0.6 and accuracy["scene"] >= 0.4, accuracy


@pytest.mark.slow
def test_customdiff_eval_toyworld_end_to_end(tmp_path, capsys):
    """The whole evaluation on the committed base (minutes on a CPU): the paper's claims hold."""
    from customdiff.__main__ import main

    assert main(["eval", "toyworld", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary) == ["base", "single", "joint", "merge", "average", "top60", "top10", "rank1"]
    image = {k: v["image"] for k, v in summary.items()}
    assert image["single"] >= image["base"] + 0.3 and image["joint"] >= image["base"] + 0.3
    assert image["merge"] > image["average"] and abs(image["top60"] - image["single"]) <= 0.1
    assert image["rank1"] < image["top60"] - 0.2
    assert (tmp_path / "contact_sheet.png").exists()
