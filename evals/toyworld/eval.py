"""The toy-world evaluation: each variant's text alignment, image alignment and storage, one table,
one JSON line, and a contact sheet.

Variants (docs/toyworld.md): `base` (the prompt's concept token dropped, so the class word alone
speaks), `single` (one concept per fine-tuning), `joint` (both concepts in one fine-tuning), `merge`
(the closed-form merge of the two singles), `average` (naive averaging of the two singles' deltas),
`top60`, `top10`, `rank1` (a single's deltas by truncated SVD: 60% or 10% of the singular-value sum,
or rank 1). One more row, `merge_ref`, is the merge with the reference's two target captions only
(`MERGE_REF`), kept for comparison in the table and results.json but not in the JSON line. Every
variant draws the same prompts and seeds: each concept at both sizes on each background none of its
photos show.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from evals.toyworld import variants
from evals.toyworld.metrics import image_outcome, parse_images, text_hit
from evals.toyworld.render import contact_sheet, render
from evals.toyworld.world import CONCEPTS, NEW_BACKGROUNDS, SIZES, ToyConcept

VARIANTS = ("base", "single", "joint", "merge", "average", "top60", "top10", "rank1")
ROWS = VARIANTS + ("merge_ref",)
# The merge for this world: each token also constrained in 8 world captions naming its class (the
# text features are 64 wide, so the reference's two captions alone leave new contexts to drift back
# to the base; docs/toyworld.md has both rows). `merge_ref` is the reference's merge.
MERGE = {"context_captions": 8}
MERGE_REF = {"context_captions": 0}
LABEL_WIDTH = 56  # contact-sheet margin for the row names
COMPRESSIONS = {"top60": {"fraction": 0.6}, "top10": {"fraction": 0.1}, "rank1": {"rank": 1}}


@dataclass(frozen=True)
class EvalConfig:
    """How many images each (variant, concept) gets: len(SIZES) x len(NEW_BACKGROUNDS) prompts x `seeds`."""

    seeds: int = 8
    steps: int = 25  # DDIM steps
    guidance: float = 5.0
    hyperparameters: variants.Hyperparameters = variants.HYPERPARAMETERS

    def __post_init__(self) -> None:
        if not 1 <= self.seeds <= 8:  # one engine request per prompt carries all its seeds (at most 8)
            raise ValueError(f"seeds must be in 1..8, got {self.seeds}")


QUICK = EvalConfig(seeds=2)


@dataclass(frozen=True)
class Job:
    """`seeds` images of one prompt: the concept, the variant drawing it and the artifacts it uses."""

    variant: str
    concept: ToyConcept
    size: str
    background: str
    digests: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return self.concept.prompt(self.size, self.background, word="" if self.variant == "base" else None)


def train_variants(base_dir: Path, store, work: Path, hp: variants.Hyperparameters,
                   trained: Callable[[], None] = lambda: None) -> tuple[dict, str, dict]:
    """The trained artifacts: one single per concept (by token) and the joint one; seconds each took.

    `trained` is called after each of the ``len(CONCEPTS) + 1`` trainings (a progress bar's step).
    """
    t0 = time.perf_counter()
    singles = {}
    for c in CONCEPTS:
        job_dir = work / f"single-{c.token.strip('<>')}"
        singles[c.token] = variants.train_concepts(base_dir, store.url, [c], job_dir, hp)
        trained()
    t1 = time.perf_counter()
    joint = variants.train_concepts(base_dir, store.url, list(CONCEPTS), work / "joint", hp)
    trained()
    return singles, joint, {"train_single": t1 - t0, "train_joint": time.perf_counter() - t1}


def derive_variants(base, store, singles: dict[str, str], joint: str) -> tuple[dict, dict]:
    """Merge, average and compress the singles; return {variant: {concept token: (digests...)}} and each
    variant's storage: the mean artifact bytes of what it loads (0 for the base)."""
    from merger.run import compress_concept, merge_concepts

    loaded = [store.get_concept(singles[c.token]) for c in CONCEPTS]
    captions = variants.world_captions()
    both = {"joint": joint, "merge": store.put_concept(merge_concepts(base, loaded, captions, **MERGE)[0]),
            "merge_ref": store.put_concept(merge_concepts(base, loaded, captions, **MERGE_REF)[0]),
            "average": store.put_concept(variants.average_concepts(loaded))}
    digests = {"base": {c.token: () for c in CONCEPTS}, "single": {t: (d,) for t, d in singles.items()}}
    for name, digest in both.items():
        digests[name] = {c.token: (digest,) for c in CONCEPTS}
    for name, target in COMPRESSIONS.items():
        digests[name] = {c.token: (store.put_concept(compress_concept(concept, **target)[0]),)
                         for c, concept in zip(CONCEPTS, loaded)}
    sizes = {name: float(np.mean([len(store.get(d)) for ds in per.values() for d in ds] or [0]))
             for name, per in digests.items()}
    return digests, sizes


def make_jobs(digests: dict[str, dict[str, tuple[str, ...]]]) -> list[Job]:
    return [Job(v, c, size, bg, digests[v][c.token]) for v in ROWS if v in digests for c in CONCEPTS
            for size in SIZES for bg in NEW_BACKGROUNDS]


def sample(engine, jobs: list[Job], config: EvalConfig, seed: int = 0) -> np.ndarray:
    """`config.seeds` images per job through the inference engine, mixed-concept batches: uint8
    [len(jobs), seeds, 64, 64, 3]; job j's image i uses seed ``seed + i`` whatever its variant."""
    from engine.request import GenerationRequest

    requests = [GenerationRequest(prompt=j.prompt, concept_digests=j.digests, num_images=config.seeds,
                                  num_inference_steps=config.steps, guidance_scale=config.guidance, seed=seed)
                for j in jobs]
    results = engine.generate_batch(requests)
    for job, result in zip(jobs, results):
        if isinstance(result, Exception):
            raise result
    images = np.stack([np.stack(r) for r in results])
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def score(jobs: list[Job], images: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and concept token: text alignment, image alignment and the outcome counts."""
    parses = parse_images(images.reshape(-1, *images.shape[2:]))
    per_job = len(images[0]) if len(images) else 0
    table: dict[str, dict[str, dict[str, float]]] = {}
    for j, job in enumerate(jobs):
        entry = table.setdefault(job.variant, {}).setdefault(
            job.concept.token, {"images": 0, "text": 0, "hit": 0, "miss": 0, "unrecognized": 0})
        for parse in parses[j * per_job : (j + 1) * per_job]:
            entry["images"] += 1
            entry["text"] += text_hit(parse, job.concept.cls, job.background, job.size)
            entry[image_outcome(parse, job.concept)] += 1
    return table


def summarize(table: dict, sizes: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each row: text, image (each the mean over concepts of its rate) and bytes."""
    out = {}
    for variant in (r for r in ROWS if r in table):
        per = table[variant].values()
        out[variant] = {"text": round(float(np.mean([e["text"] / e["images"] for e in per])), 3),
                        "image": round(float(np.mean([e["hit"] / e["images"] for e in per])), 3),
                        "bytes": int(sizes[variant])}
    return out


def format_table(summary: dict, table: dict) -> str:
    tokens = [c.token for c in CONCEPTS]
    head = f"{'variant':<9} {'text':>6} {'image':>6} " + " ".join(f"{'img ' + t:>11}" for t in tokens) + f" {'bytes':>10}"
    lines = [head, "-" * len(head)]
    for v in summary:
        per = " ".join(f"{table[v][t]['hit'] / table[v][t]['images']:>11.3f}" for t in tokens)
        s = summary[v]
        lines.append(f"{v:<9} {s['text']:>6.3f} {s['image']:>6.3f} {per} {s['bytes']:>10,d}")
    return "\n".join(lines)


def write_sheet(jobs: list[Job], images: np.ndarray, path: Path) -> Path:
    """Rows: what each prompt asks for, then one row per variant; columns: each concept's prompts, first seed."""
    columns = [(c, size, bg) for c in CONCEPTS for size in SIZES for bg in NEW_BACKGROUNDS]
    first = {(j.variant, j.concept.token, j.size, j.background): images[i][0] for i, j in enumerate(jobs)}
    rows = [[render(c.scene(size, bg)) for c, size, bg in columns]]
    rows += [[first[(v, c.token, size, bg)] for c, size, bg in columns] for v in VARIANTS]
    grid = contact_sheet(rows, scale=1, gap=2)
    sheet = Image.new("RGB", (grid.width + LABEL_WIDTH, grid.height), (255, 255, 255))
    sheet.paste(grid, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(("asked",) + VARIANTS):
        draw.text((4, 2 + i * 66 + 26), name, fill=(0, 0, 0))
    sheet.save(path)
    return path


def run(out: Path, base_dir: Path, config: EvalConfig, progress: bool = False) -> dict:
    """The whole evaluation; writes out/results.json and out/contact_sheet.png, returns the summary.

    `progress` shows a bar over the stages on a terminal (`concepts.progress`).
    """
    from concepts.base import load_base
    from concepts.progress import StageBar
    from concepts.store import ArtifactStore
    from engine.engine import Engine

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "work", ignore_errors=True)  # a job directory left there would resume, not retrain
    t0 = time.perf_counter()
    store = ArtifactStore(str(out / "store"))
    names = [f"training single {c.token}" for c in CONCEPTS] + ["training joint", "merging and compressing",
                                                                  "sampling", "scoring"]
    with StageBar("eval toyworld", names, enabled=progress) as stages:
        hp = config.hyperparameters
        singles, joint, seconds = train_variants(base_dir, store, out / "work", hp, trained=stages.next)
        base = load_base(base_dir)
        t1 = time.perf_counter()
        digests, sizes = derive_variants(base, store, singles, joint)
        seconds["merge_compress"] = time.perf_counter() - t1
        stages.next()
        jobs = make_jobs(digests)
        t1 = time.perf_counter()
        images = sample(Engine(base, store, max_batch_images=64), jobs, config)
        seconds["sample"] = time.perf_counter() - t1
        stages.next()
        table = score(jobs, images)
        stages.next()
    summary = summarize(table, sizes)
    seconds["total"] = time.perf_counter() - t0
    sheet = write_sheet(jobs, images, out / "contact_sheet.png")
    results = {"summary": summary, "per_concept": table, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "config": asdict(config), "digests": digests, "contact_sheet": str(sheet)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(format_table(summary, table))
    print(f"contact sheet: {sheet}; seconds: {results['seconds']}")
    print(json.dumps({v: summary[v] for v in VARIANTS}))
    return results
