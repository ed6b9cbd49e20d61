"""The toy world: renderer, held-out concepts, the ground-truth metric, the committed base, eval wiring."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from evals.toyworld.metrics import (
    attribute_accuracy,
    image_outcome,
    parse_image,
    parse_images,
    parse_pair_images,
    text_hit,
)
from evals.toyworld.render import render, render_batch, render_pair, render_pairs
from evals.toyworld.world import (
    COLOURS,
    CONCEPTS,
    TEST,
    VALIDATION,
    Look,
    Pair,
    Scene,
    all_scenes,
    compose_prompt,
    is_held_out,
    pretraining_scenes,
    sample_pair,
    sample_pair_caption,
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
    assert len(pretrained) == 7200 - 8 * 2 * 2 * 6  # eight concepts, both colour orders, 2 sizes, 6 backgrounds
    assert not any(is_held_out(s) for s in pretrained)
    concepts = VALIDATION + TEST
    assert len({c.token for c in concepts}) == 8 and not set(VALIDATION) & set(TEST)
    for split in (VALIDATION, TEST):  # several classes and both two-colour patterns in each split
        assert len({c.cls for c in split}) == 4 and {c.look.pattern for c in split} == {"two tone", "striped"}
    for concept in concepts:
        assert not any(s.cls == concept.cls and s.look == concept.look for s in pretrained)
        others = sum(c.cls == concept.cls for c in concepts) - 1  # another held-out concept of the class
        assert sum(s.cls == concept.cls for s in pretrained) == 1440 - 24 * (1 + others)
        assert sum(s.look == concept.look for s in pretrained) == 4 * 12  # the look on the other four classes
    assert {"ring", "square", "two", "tone", "striped", "left", "ktn", "pll"} <= set(vocabulary())


def test_pairs_render_side_by_side_and_parse_back_half_by_half():
    import random

    rng = random.Random(0)
    pairs = [sample_pair(pretraining_scenes(), rng) for _ in range(60)]
    assert all(not is_held_out(p.left) and not is_held_out(p.right) for p in pairs)
    images = render_pairs(pairs)
    assert images.shape == (60, 64, 128, 3)
    assert np.array_equal(images[0], np.concatenate([render(pairs[0].left), render(pairs[0].right)], axis=1))
    parses = parse_pair_images(images)
    assert all(p.recognized and (p.left.scene, p.right.scene) == (q.left, q.right) for p, q in zip(parses, pairs))
    caption = sample_pair_caption(pairs[0], random.Random(1))
    assert " left of a " in caption and caption.count(" a ") + caption.startswith("a ") >= 2
    ring, square = CONCEPTS
    pair = Pair(ring.scene("small", "navy"), square.scene("large", "navy"))
    assert pair.caption() == ("a small orange and cyan two tone ring left of a large yellow and blue striped square "
                              "on a navy background")
    assert compose_prompt(ring, square, ("small", "large"), "navy") == (
        "a small <new1> ring left of a large <new2> square on a navy background")
    swapped = parse_pair_images(render_pair(Pair(pair.right, pair.left))[None])[0]
    assert swapped.recognized and swapped.left.scene.cls == "square"
    with pytest.raises(ValueError, match="share a background"):
        Pair(ring.scene("small", "navy"), square.scene("large", "gray"))


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
    """Variants, engine sampling (one-concept, composition and drift prompts; `compose_auto` through an
    engine that merges on first use), scoring, the JSON summary and the sheets, with random stand-in
    concepts (training goes through the trainer library, tested with the trainer)."""
    from concepts.store import ArtifactStore
    from engine.engine import Engine
    from evals.toyworld import eval as toy
    from tests.conftest import random_concept

    config = toy.EvalConfig(seeds=1, steps=2, pairs=1)
    store = ArtifactStore(str(tmp_path / "store"))
    concepts = [c for pair in config.compositions for c in pair]
    singles = {c.token: store.put_concept(random_concept(tiny_base, i, c.token, class_word=c.cls))
               for i, c in enumerate(concepts)}
    joints = {toy.pair_key(p): store.put_concept(toy.variants.average_concepts([store.get_concept(singles[c.token])
                                                                                 for c in p]))
              for p in config.compositions}
    digests, sizes = toy.derive_variants(tiny_base, store, config, singles, joints)
    jobs = toy.make_jobs(config, digests)
    kinds = [j.kind for j in jobs]
    assert (kinds.count("single"), kinds.count("drift"), kinds.count("compose")) == (7 * 2 * 6, 6 * 2 * 6, 7 * 6)
    prompts = {j.prompt for j in jobs}
    assert {"a large circle on a navy background", "a small <new6> triangle on a brown background",
            "a small <new5> circle left of a large <new6> triangle on a olive background",
            "a large circle left of a small triangle on a navy background"} <= prompts
    assert all("<" not in j.prompt for j in jobs if j.kind == "drift" or j.variant in ("base", "compose_base"))
    auto = [j for j in jobs if j.variant == "compose_auto"]
    others = [j for j in jobs if j.variant != "compose_auto"]
    images = toy.sample(Engine(tiny_base, store, max_batch_images=64), others, config)
    merging = Engine(tiny_base, store, compose="merge", compose_captions=toy.variants.world_captions(200))
    auto_images, seconds = toy.time_auto(merging, auto, config)
    assert seconds["auto_first_s"] > 0 and seconds["auto_next_s"] > 0
    jobs, images = others + auto, images + auto_images
    assert {im.shape for im, j in zip(images, jobs) if j.kind == "compose"} == {(1, 64, 128, 3)}
    summary = toy.summarize(jobs, toy.outcomes(jobs, images), sizes)
    assert list(summary["rows"]) == list(toy.SINGLE_ROWS + toy.COMPOSE_ROWS)
    assert list(summary["drift"]) == list(toy.DRIFT_ROWS) and summary["drift"]["base"] == 0.0
    for row in summary["rows"].values():
        assert 0.0 <= row["text"] <= 1.0 and 0.0 <= row["image"] <= 1.0
        low, high = row["ci95"]
        assert 0.0 <= low <= row.get("both", row["image"]) <= high <= 1.0
    bytes_ = {k: v["bytes"] for k, v in summary["rows"].items()}
    assert bytes_["base"] == bytes_["compose_base"] == 0 and bytes_["top60"] < bytes_["single"]
    assert bytes_["merge_top60"] < bytes_["merge"] and bytes_["compose_sum"] == bytes_["compose_auto"] == 2 * bytes_["single"]
    sheets = [Image.open(p) for p in toy.write_sheets(jobs, images, tmp_path)]
    assert [s.size for s in sheets] == [(toy.LABEL_WIDTH + 6 * 66 + 2, 8 * 66 + 2),
                                        (toy.LABEL_WIDTH + 3 * 130 + 2, 8 * 66 + 2)]


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


def test_customdiff_eval_toyworld_quick(tmp_path, capsys):
    """`customdiff eval toyworld --quick --json` on the committed base (minutes): one test pair trained,
    merged, composed; the JSON line's shape, and the claims' direction with loose bounds."""
    from customdiff.__main__ import main

    assert main(["eval", "toyworld", "--quick", "--json", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["split"] == "test" and list(result["drift"]) == ["base", "single", "joint", "merge", "merge_top60",
                                                                    "average"]
    rows = result["rows"]
    assert {"compose_joint", "compose_merge", "compose_merge_top60", "compose_average", "compose_sum",
            "compose_auto"} <= set(rows)
    assert all(set(r) >= {"text", "image", "ci95", "bytes"} for r in rows.values())
    assert rows["single"]["image"] >= rows["base"]["image"] + 0.2  # 0.333 against 0.000 when written
    assert rows["compose_merge"]["image"] >= rows["compose_average"]["image"]  # 0.042 against 0.000
    assert abs(rows["compose_auto"]["image"] - rows["compose_merge"]["image"]) <= 0.05  # the same merge
    assert (tmp_path / "contact_sheet.png").exists() and (tmp_path / "compose_sheet.png").exists()


@pytest.mark.slow
def test_customdiff_eval_toyworld_end_to_end(tmp_path, capsys):
    """The whole evaluation on the test concepts (10 minutes on 2 CPU cores): the claims that hold on the
    committed base (docs/toyworld.md). Composition's bars (both concepts > 0.2) do not hold yet: issue 20."""
    from customdiff.__main__ import main

    assert main(["eval", "toyworld", "--json", "--out", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert rows["single"]["image"] >= rows["base"]["image"] + 0.3
    assert rows["merge"]["image"] > rows["average"]["image"] + 0.1
    assert abs(rows["merge_top60"]["image"] - rows["merge"]["image"]) <= 0.1
    assert abs(rows["compose_auto"]["image"] - rows["compose_merge"]["image"]) <= 0.05
