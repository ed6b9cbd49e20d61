"""`customdiff demo`: the whole mission on one machine, through the gRPC API only.

Starts `customdiff serve` (registry, store, Triton, the three services) on loopback on the toy world's
pretrained base (`evals/toyworld/base`, docs/toyworld.md), trains two concepts it never saw from
rendered photos, merges them, compresses the merge, generates each concept on backgrounds no photo
showed (and the base with the class word alone, for comparison), and writes PNGs, a contact sheet and
a summary into the output directory.

Its inputs are files (`evals/toyworld/demo/`, written by `python -m evals.toyworld.demo_inputs`): the
demo reads them and imports nothing of `evals`, so the CLI works where `evals` is not installed.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

from concepts.errors import FailedPrecondition

API_KEY = "demo-key"
TOYWORLD = Path(__file__).resolve().parents[2] / "evals" / "toyworld"
INPUTS, BASE_DIR = TOYWORLD / "demo", TOYWORLD / "base"


def inputs(directory: Path = INPUTS) -> dict:
    """`demo.json`: the two concepts (name, class, token, prompts) and the world's training settings.

    Raises:
        FailedPrecondition: not a source checkout (the demo's files and the toy base are not here).
    """
    if not (directory / "demo.json").exists() or not (BASE_DIR / "model_index.json").exists():
        raise FailedPrecondition(f"the demo needs a source checkout of customdiff: {directory} and {BASE_DIR} "
                                 "are missing")
    return json.loads((directory / "demo.json").read_text())


def photos(name: str, kind: str = "photos", directory: Path = INPUTS) -> list[bytes]:
    """The concept's PNGs: the user's 6 photos ("photos") or its regularization images ("class")."""
    return [path.read_bytes() for path in sorted((directory / name / kind).glob("*.png"))]


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the end-to-end scenario on the toy world's base through the gRPC API")
    demo.add_argument("--out", default="demo-output", help="output directory (default: demo-output)")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps per concept (default: the toy world's, docs/toyworld.md)")
    demo.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from customdiff_client import Client
    from customdiff.local import start_serve
    from customdiffusion.v1 import trainer_service_pb2 as tpb

    demo = inputs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"times_s": {}, "concepts": {}}
    t0 = time.perf_counter()
    # 1. The whole stack, on loopback.
    shutil.rmtree(out / "data", ignore_errors=True)  # a fresh registry and store: request ids repeat per run
    proc, ports = start_serve(out, api_keys=f"{API_KEY}=demo", max_concurrent_jobs=2, base_model=str(BASE_DIR))
    summary["times_s"]["start_stack"] = round(time.perf_counter() - t0, 1)
    client = Client(*(f"127.0.0.1:{ports[c]}" for c in ("trainer", "merger", "inference")), api_key=API_KEY)
    try:
        _scenario(client, tpb, demo, out, args.steps, summary)
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)
    summary["times_s"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


def _scenario(client, tpb, demo: dict, out: Path, steps: int | None, summary: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    hp = demo["training"]
    steps = steps or hp["steps"]
    concepts = {c["name"]: c for c in demo["concepts"]}

    # 2. Train both concepts at once, with live progress.
    def train(name: str):
        c = concepts[name]
        concept = tpb.ConceptSpec(
            name=name, class_prompt=c["class_prompt"], modifier_token=c["modifier_token"],
            instance_prompt=c["instance_prompt"], images=[tpb.ImageInput(data=d) for d in photos(name)],
            class_images=[tpb.ImageInput(data=d) for d in photos(name, "class")])
        hyper = tpb.Hyperparameters(resolution=hp["resolution"], max_train_steps=steps,
                                    learning_rate=hp["learning_rate"], train_batch_size=hp["batch_size"],
                                    seed=hp["seed"], disable_augmentation=not hp["augment"])

        def show(event):
            p = event.training_job.progress
            if event.log_line and '"progress"' in event.log_line and p.step % 50 == 0:
                print(f"  [{name}] step {p.step}/{p.total_steps} loss {p.loss:.4f} {p.images_per_second:.1f} img/s "
                      f"eta {p.eta_seconds:.0f}s", flush=True)
        t = time.perf_counter()
        job = client.train([concept], hyperparameters=hyper, request_id=f"demo-{name}", on_event=show)
        summary["times_s"][f"train_{name}"] = round(time.perf_counter() - t, 1)
        return job

    print("training two concepts through TrainerService ...", flush=True)
    with ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(train, concepts))
    # 3. Merge, then compress the merge (the paper's top 60%).
    t = time.perf_counter()
    merged = client.merge(list(concepts), concept_name="ring-and-square", context_captions=hp["context_captions"],
                          regularization_captions=(INPUTS / "captions.txt").read_text().splitlines())
    summary["times_s"]["merge"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    compressed = client.compress("ring-and-square", fraction=0.6, concept_name="ring-and-square-top60")
    summary["times_s"]["compress"] = round(time.perf_counter() - t, 1)
    for job in jobs + [merged, compressed]:
        c = job.concept
        summary["concepts"][c.name] = {"version": c.version, "digest": c.digest, "tokens": list(c.tokens),
                                       "bytes": c.size_bytes}
    summary["merge_report"] = {k: round(v, 6) for k, v in merged.report.summary.items()}
    # 4. Each concept (<new1> the ring, <new2> the square) on a background its photos never showed: alone,
    #    in the merge and in its compression; and the base with the class word alone.
    prompts = [("base", [], c["base_prompt"]) for c in concepts.values()]
    prompts += [(name, [name], c["prompt"]) for name, c in concepts.items()]
    for label, name in (("merged", "ring-and-square"), ("merged-top60", "ring-and-square-top60")):
        prompts += [(label, [name], c["prompt"]) for c in concepts.values()]
    images = []
    t = time.perf_counter()
    for label, names, prompt in prompts:
        response = client.generate(prompt, concepts=names, num_images=2, num_inference_steps=25, seed=0,
                                   height=64, width=64, guidance_scale=5.0)
        for image in response.images:
            (out / f"{label}-{sum(x[0] == label for x in images)}.png").write_bytes(image.png)
            images.append((label, image.png))
    summary["times_s"]["generate_16_images"] = round(time.perf_counter() - t, 1)
    _contact_sheet(images, out / "contact-sheet.png")
    summary["outputs"] = str(out)


def _contact_sheet(images: list[tuple[str, bytes]], path: Path) -> None:
    from PIL import Image, ImageDraw

    tile, label_h = 128, 14
    rows = {}
    for label, png in images:
        rows.setdefault(label, []).append(Image.open(io.BytesIO(png)).convert("RGB").resize((tile, tile)))
    cols = max(len(v) for v in rows.values())
    sheet = Image.new("RGB", (cols * tile, len(rows) * (tile + label_h)), "white")
    d = ImageDraw.Draw(sheet)
    for r, (label, tiles) in enumerate(rows.items()):
        y = r * (tile + label_h)
        d.text((2, y), label, fill="black")
        for c, img in enumerate(tiles):
            sheet.paste(img, (c * tile, y + label_h))
    sheet.save(path)
