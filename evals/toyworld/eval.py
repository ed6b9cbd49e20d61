"""The toy-world evaluation (world v2) on one split's held-out concepts: one-concept prompts, two-concept
prompts (the paper's composition), and the drift of the class word; one table, one JSON line, contact
sheets.

Splits (`world.SPLITS`): the `validation` concepts chose every setting of this file and of `variants`;
the `test` concepts are only reported. Each split's concepts form two pairs (`world.COMPOSITIONS`).

One-concept rows, prompts ``a large <new5> circle on a navy background`` (each concept at both sizes on
each background none of its photos show): `base` (the token dropped, the class word alone), `single`
(one concept per fine-tuning), `joint` (the pair in one fine-tuning), `merge` (the closed-form merge of
the pair's singles), `average` (their deltas averaged), `top60` (a single compressed to 60% of its
singular-value sum), `merge_top60` (the merge compressed to 60% of its spectrum in the metric of the
features it sees, `merger.run.compress_concept(base=...)`).

Composition rows, prompts ``a small <new5> circle left of a large <new6> triangle on a brown background``
(a 64x128 image; both size orders, each new background): `compose_joint`, `compose_merge`,
`compose_merge_top60`, `compose_average` with the pair's artifact; `compose_sum` names both singles and the
engine sums their deltas; `compose_auto` names both singles and the engine merges them on first use
(`Engine(compose="merge")`); `compose_base` drops both tokens. `both` is the rate at which the left half
shows the first concept and the right half the second.

Drift: the class word alone (``a large circle on a navy background``) with each variant's artifact
loaded. The total variation distance between the parsed scenes' distribution (class and look, or
unrecognized) and the base's on the same prompts and seeds, and the rate at which the concept leaks in.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from evals.toyworld import variants
from evals.toyworld.metrics import image_outcome, parse_images, parse_pair_images, text_hit
from evals.toyworld.render import contact_sheet, render, render_pair
from evals.toyworld.world import COMPOSITIONS, NEW_BACKGROUNDS, SIZES, SPLITS, Pair, ToyConcept, compose_prompt

SINGLE_ROWS = ("base", "single", "joint", "merge", "average", "top60", "merge_top60")
COMPOSE_ROWS = ("compose_base", "compose_joint", "compose_merge", "compose_merge_top60", "compose_average",
                "compose_sum", "compose_auto")
DRIFT_ROWS = ("base", "single", "joint", "merge", "merge_top60", "average")
# The merge for this world: each token also constrained in 8 world captions naming its class (the text
# features are 64 wide, so the reference's two captions alone leave new contexts to drift back to the
# base; docs/toyworld.md).
MERGE = {"context_captions": 8}
TOP60 = {"fraction": 0.6}
COMPOSE_SIZES = (("small", "large"), ("large", "small"))
LABEL_WIDTH = 124  # contact-sheet margin for the row names
BOOTSTRAP = 1000


@dataclass(frozen=True)
class EvalConfig:
    """What is evaluated: `split`'s first `pairs` pairs, `seeds` images per prompt."""

    split: str = "test"
    seeds: int = 8
    pairs: int = 2
    steps: int = 25  # DDIM steps
    guidance: float = 5.0
    hyperparameters: variants.Hyperparameters = variants.HYPERPARAMETERS

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {self.split!r}")
        if not 1 <= self.seeds <= 8:  # one engine request per prompt carries all its seeds (at most 8)
            raise ValueError(f"seeds must be in 1..8, got {self.seeds}")
        if not 1 <= self.pairs <= len(COMPOSITIONS[self.split]):
            raise ValueError(f"pairs must be in 1..{len(COMPOSITIONS[self.split])}, got {self.pairs}")

    @property
    def compositions(self) -> tuple[tuple[ToyConcept, ToyConcept], ...]:
        return COMPOSITIONS[self.split][: self.pairs]


# --quick: one pair, 2 seeds, half the training steps: the wiring and the direction of the claims.
QUICK = EvalConfig(seeds=2, pairs=1, hyperparameters=dataclasses.replace(variants.HYPERPARAMETERS, steps=250))


@dataclass(frozen=True)
class Job:
    """`seeds` images of one prompt: its kind (`single`, `compose` or `drift`), the concepts it asks for
    (one, or the pair left to right), their sizes, the background and the artifacts it loads."""

    variant: str
    kind: str
    concepts: tuple[ToyConcept, ...]
    sizes: tuple[str, ...]
    background: str
    digests: tuple[str, ...]

    @property
    def prompt(self) -> str:
        if self.kind == "compose":
            return compose_prompt(*self.concepts, self.sizes, self.background, tokens=self.variant != "compose_base")
        keep = self.kind == "single" and self.variant != "base"
        return self.concepts[0].prompt(self.sizes[0], self.background, word=None if keep else "")


def train_variants(base_dir: Path, store, work: Path, config: EvalConfig,
                   trained: Callable[[], None] = lambda: None) -> tuple[dict, dict, dict]:
    """One single per concept (by token) and one joint per pair (by the pair's tokens); seconds each took.
    `trained` is called after each training (a progress bar's step)."""
    hp, singles, joints = config.hyperparameters, {}, {}
    t0 = time.perf_counter()
    for pair in config.compositions:
        for c in pair:
            singles[c.token] = variants.train_concepts(base_dir, store.url, [c], work / f"single-{c.token.strip('<>')}", hp)
            trained()
    t1 = time.perf_counter()
    for pair in config.compositions:
        key = "-".join(c.token.strip("<>") for c in pair)
        joints[pair_key(pair)] = variants.train_concepts(base_dir, store.url, list(pair), work / f"joint-{key}", hp)
        trained()
    return singles, joints, {"train_single": t1 - t0, "train_joint": time.perf_counter() - t1}


def pair_key(pair: tuple[ToyConcept, ...]) -> str:
    return " ".join(c.token for c in pair)


def derive_variants(base, store, config: EvalConfig, singles: dict[str, str], joints: dict[str, str]
                    ) -> tuple[dict[str, dict[str, tuple[str, ...]]], dict[str, float]]:
    """Merge, average and compress the singles. Returns {variant: {token or pair key: digests}} (one-concept
    variants by token, composition variants by pair key) and each variant's mean artifact bytes."""
    from merger.run import compress_concept, merge_concepts

    captions = variants.world_captions()
    digests: dict[str, dict[str, tuple[str, ...]]] = {v: {} for v in SINGLE_ROWS + COMPOSE_ROWS}
    for pair in config.compositions:
        loaded = [store.get_concept(singles[c.token]) for c in pair]
        merged = merge_concepts(base, loaded, captions, **MERGE, parents=[singles[c.token] for c in pair])[0]
        compressed = compress_concept(merged, **TOP60, base=base, captions=captions)[0]
        shared = {"joint": joints[pair_key(pair)], "merge": store.put_concept(merged),
                  "merge_top60": store.put_concept(compressed), "average": store.put_concept(variants.average_concepts(loaded))}
        key = pair_key(pair)
        for name, digest in shared.items():
            digests[f"compose_{name}"][key] = (digest,)
            for c in pair:
                digests[name][c.token] = (digest,)
        digests["compose_sum"][key] = digests["compose_auto"][key] = tuple(singles[c.token] for c in pair)
        digests["compose_base"][key] = ()
        for c, concept in zip(pair, loaded):
            digests["base"][c.token] = ()
            digests["single"][c.token] = (singles[c.token],)
            digests["top60"][c.token] = (store.put_concept(compress_concept(concept, **TOP60)[0]),)
    sizes = {name: float(np.mean([sum(len(store.get(d)) for d in ds) for ds in per.values()] or [0]))
             for name, per in digests.items()}
    return digests, sizes


def make_jobs(config: EvalConfig, digests: dict[str, dict[str, tuple[str, ...]]]) -> list[Job]:
    jobs = []
    concepts = [c for pair in config.compositions for c in pair]
    for v in SINGLE_ROWS:
        jobs += [Job(v, "single", (c,), (size,), bg, digests[v][c.token])
                 for c in concepts for size in SIZES for bg in NEW_BACKGROUNDS]
    for v in DRIFT_ROWS:
        jobs += [Job(v, "drift", (c,), (size,), bg, digests[v][c.token])
                 for c in concepts for size in SIZES for bg in NEW_BACKGROUNDS]
    for v in COMPOSE_ROWS:
        jobs += [Job(v, "compose", pair, sizes, bg, digests[v][pair_key(pair)])
                 for pair in config.compositions for sizes in COMPOSE_SIZES for bg in NEW_BACKGROUNDS]
    return jobs


def sample(engine, jobs: list[Job], config: EvalConfig, seed: int = 0) -> list[np.ndarray]:
    """`config.seeds` images per job through the inference engine, mixed-concept batches: uint8
    [seeds, 64, 64 or 128, 3] per job; job j's image i uses seed ``seed + i`` whatever its variant."""
    from engine.request import GenerationRequest

    requests = [GenerationRequest(prompt=j.prompt, concept_digests=j.digests, num_images=config.seeds,
                                  num_inference_steps=config.steps, guidance_scale=config.guidance, seed=seed,
                                  height=64, width=128 if j.kind == "compose" else 64) for j in jobs]
    results = engine.generate_batch(requests)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return [np.clip(np.rint(np.stack(r) * 255.0), 0, 255).astype(np.uint8) for r in results]


def _drift_key(parse) -> str:
    return f"{parse.scene.cls} {parse.scene.look.words()}" if parse.recognized else "unrecognized"


def outcomes(jobs: list[Job], images: list[np.ndarray]) -> list[dict[str, list]]:
    """Per job, per image: `text` and `image` (hit) for one-concept jobs; `text`, `left`, `right` and
    `both` for compositions; `look` (the parsed class and look) and `leak` for drift."""
    out = []
    for job, batch in zip(jobs, images):
        if job.kind == "compose":
            a, b = job.concepts
            parses = parse_pair_images(batch)
            left = [image_outcome(p.left, a) == "hit" for p in parses]
            right = [image_outcome(p.right, b) == "hit" for p in parses]
            text = [p.recognized and text_hit(p.left, a.cls, job.background, job.sizes[0])
                    and text_hit(p.right, b.cls, job.background, job.sizes[1]) for p in parses]
            out.append({"text": text, "left": left, "right": right, "both": [x and y for x, y in zip(left, right)]})
            continue
        parses = parse_images(batch)
        concept = job.concepts[0]
        hits = [image_outcome(p, concept) == "hit" for p in parses]
        if job.kind == "single":
            out.append({"text": [text_hit(p, concept.cls, job.background, job.sizes[0]) for p in parses], "image": hits})
        else:
            out.append({"look": [_drift_key(p) for p in parses], "leak": hits})
    return out


def _rate_ci(groups: list[list[bool]], rng: np.random.Generator) -> tuple[float, list[float]]:
    """Mean over groups of each group's rate, and its bootstrap 95% interval (images resampled within
    each group: a concept or a pair)."""
    arrays = [np.asarray(g, dtype=float) for g in groups]
    rate = float(np.mean([a.mean() for a in arrays]))
    draws = np.mean([a[rng.integers(len(a), size=(BOOTSTRAP, len(a)))].mean(axis=1) for a in arrays], axis=0)
    return rate, [round(float(np.percentile(draws, 2.5)), 3), round(float(np.percentile(draws, 97.5)), 3)]


def _tv(p: Counter, q: Counter) -> float:
    n, m = sum(p.values()), sum(q.values())
    return 0.5 * sum(abs(p[k] / n - q[k] / m) for k in set(p) | set(q))


def summarize(jobs: list[Job], results: list[dict[str, list]], sizes: dict[str, float]) -> dict:
    """Rows (text, image, both for compositions, ci95 of image or both, bytes), drift and leak per variant."""
    rng = np.random.default_rng(0)
    grouped: dict[tuple[str, str], dict[str, list]] = {}
    for job, result in zip(jobs, results):
        entry = grouped.setdefault((job.kind, job.variant), {}).setdefault(pair_key(job.concepts), {})
        for name, values in result.items():
            entry.setdefault(name, []).extend(values)
    rows = {}
    for v in SINGLE_ROWS:
        groups = grouped[("single", v)].values()
        image, ci = _rate_ci([g["image"] for g in groups], rng)
        rows[v] = {"text": round(float(np.mean([np.mean(g["text"]) for g in groups])), 3), "image": round(image, 3),
                   "ci95": ci, "bytes": int(sizes[v])}
    for v in COMPOSE_ROWS:
        groups = grouped[("compose", v)].values()
        both, ci = _rate_ci([g["both"] for g in groups], rng)
        rows[v] = {"text": round(float(np.mean([np.mean(g["text"]) for g in groups])), 3),
                   "image": round(float(np.mean([np.mean(g["left"] + g["right"]) for g in groups])), 3),
                   "left": round(float(np.mean([np.mean(g["left"]) for g in groups])), 3),
                   "right": round(float(np.mean([np.mean(g["right"]) for g in groups])), 3),
                   "both": round(both, 3), "ci95": ci, "bytes": int(sizes[v])}
    base = grouped[("drift", "base")]
    drift = {v: round(float(np.mean([_tv(Counter(g["look"]), Counter(base[k]["look"]))
                                     for k, g in grouped[("drift", v)].items()])), 3) for v in DRIFT_ROWS}
    leak = {v: round(float(np.mean([np.mean(g["leak"]) for g in grouped[("drift", v)].values()])), 3)
            for v in DRIFT_ROWS}
    return {"rows": rows, "drift": drift, "leak": leak}


def format_table(summary: dict) -> str:
    head = f"{'variant':<20} {'text':>6} {'image':>6} {'both':>6} {'95% interval':>14} {'drift':>6} {'leak':>6} {'bytes':>10}"
    lines = [head, "-" * len(head)]
    for v, row in summary["rows"].items():
        one = not v.startswith("compose_")
        drift, leak = (summary["drift"].get(v), summary["leak"].get(v)) if one else (None, None)
        both = f"{row['both']:>6.3f}" if "both" in row else f"{'':>6}"
        lines.append(f"{v:<20} {row['text']:>6.3f} {row['image']:>6.3f} {both} "
                     f"{'[%.2f, %.2f]' % tuple(row['ci95']):>14} {'' if drift is None else f'{drift:.3f}':>6} "
                     f"{'' if leak is None else f'{leak:.3f}':>6} {row['bytes']:>10,d}")
    return "\n".join(lines)


def write_sheets(jobs: list[Job], images: list[np.ndarray], out: Path) -> list[Path]:
    """Two contact sheets, first seed of each prompt: one-concept prompts (large, per background) and
    compositions (small left of large, per background); a row per variant under the asked-for scenes."""
    first = {(j.kind, j.variant, pair_key(j.concepts), j.sizes, j.background): images[i][0] for i, j in enumerate(jobs)}
    singles = [j for j in jobs if j.kind == "single" and j.variant == "base" and j.sizes == ("large",)]
    composed = [j for j in jobs if j.kind == "compose" and j.variant == "compose_base" and j.sizes == COMPOSE_SIZES[0]]
    sheets = []
    for name, columns, rows, asked in (
        ("contact_sheet.png", singles, SINGLE_ROWS, lambda j: render(j.concepts[0].scene(j.sizes[0], j.background))),
        ("compose_sheet.png", composed, COMPOSE_ROWS,
         lambda j: render_pair(Pair(*(c.scene(s, j.background) for c, s in zip(j.concepts, j.sizes))))),
    ):
        kind = columns[0].kind
        grid_rows = [[asked(j) for j in columns]]
        grid_rows += [[first[(kind, v, pair_key(j.concepts), j.sizes, j.background)] for j in columns] for v in rows]
        grid = contact_sheet(grid_rows, scale=1, gap=2)
        sheet = Image.new("RGB", (grid.width + LABEL_WIDTH, grid.height), (255, 255, 255))
        sheet.paste(grid, (LABEL_WIDTH, 0))
        draw = ImageDraw.Draw(sheet)
        for i, label in enumerate(("asked",) + rows):
            draw.text((4, 2 + i * 66 + 26), label, fill=(0, 0, 0))
        sheet.save(out / name)
        sheets.append(out / name)
    return sheets


def time_auto(engine, jobs: list[Job], config: EvalConfig) -> tuple[list[np.ndarray], dict[str, float]]:
    """`compose_auto`'s images, through an engine that merges on first use; the seconds of each pair's
    first request (the merge included) and the mean of the next ones."""
    images, first, rest = [], [], []
    for pair in config.compositions:
        mine = [j for j in jobs if pair_key(j.concepts) == pair_key(pair)]
        for i, job in enumerate(mine):
            t0 = time.perf_counter()
            images += sample(engine, [job], config)
            (first if i == 0 else rest).append(time.perf_counter() - t0)
    return images, {"auto_first_s": round(float(np.mean(first)), 3), "auto_next_s": round(float(np.mean(rest)), 3)}


def run(out: Path, base_dir: Path, config: EvalConfig, progress: bool = False, table: bool = True) -> dict:
    """The whole evaluation; writes out/results.json and the contact sheets, prints the table (unless
    `table` is False) and one JSON line, returns the summary.

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
    names = [f"training single {c.token}" for pair in config.compositions for c in pair]
    names += [f"training joint {pair_key(pair)}" for pair in config.compositions]
    names += ["merging and compressing", "sampling", "scoring"]
    with StageBar("eval toyworld", names, enabled=progress) as stages:
        singles, joints, seconds = train_variants(base_dir, store, out / "work", config, trained=stages.next)
        base = load_base(base_dir)
        t1 = time.perf_counter()
        digests, sizes = derive_variants(base, store, config, singles, joints)
        seconds["merge_compress"] = time.perf_counter() - t1
        stages.next()
        jobs = make_jobs(config, digests)
        auto = [j for j in jobs if j.variant == "compose_auto"]
        others = [j for j in jobs if j.variant != "compose_auto"]
        t1 = time.perf_counter()
        images = sample(Engine(base, store, max_batch_images=64), others, config)
        seconds["sample"] = time.perf_counter() - t1
        merging = Engine(base, store, max_batch_images=64, compose="merge", compose_captions=variants.world_captions(),
                         compose_context_captions=MERGE["context_captions"])
        auto_images, auto_seconds = time_auto(merging, auto, config)
        seconds.update(auto_seconds)
        jobs, images = others + auto, images + auto_images
        stages.next()
        summary = summarize(jobs, outcomes(jobs, images), sizes)
        stages.next()
    seconds["total"] = time.perf_counter() - t0
    sheets = write_sheets(jobs, images, out)
    summary = {"split": config.split, **summary, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    results = {**summary, "config": asdict(config), "digests": digests, "sheets": [str(s) for s in sheets],
               "prompts": [j.prompt for j in jobs]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if table:
        print(format_table(summary))
        print(f"contact sheets: {', '.join(str(s) for s in sheets)}; seconds: {summary['seconds']}")
    print(json.dumps({k: summary[k] for k in ("split", "rows", "drift", "leak", "seconds")}))
    return summary
