"""`customdiff demo`: the whole mission on one machine, through the gRPC API only.

Starts `customdiff serve` (registry, store, Triton, the three services) on loopback, trains two
concepts on images it draws itself, merges them, compresses the result, generates with each, and
writes PNGs, a contact sheet and a summary into the output directory.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

API_KEY = "demo-key"
# Two concepts the tiny base has never seen: one instance of "square" and one of "ring".
CONCEPTS = {
    "striped-square": {"class_prompt": "square", "colors": [(230, 120, 20), (20, 60, 200)], "shape": "square"},
    "two-tone-ring": {"class_prompt": "ring", "colors": [(240, 200, 30), (30, 190, 190)], "shape": "ring"},
}


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the end-to-end scenario on the tiny base through the gRPC API")
    demo.add_argument("--out", default="demo-output", help="output directory (default: demo-output)")
    demo.add_argument("--steps", type=int, default=60, help="training steps per concept (default 60)")
    demo.set_defaults(run=_run)


def draw(shape: str, colors: list[tuple[int, int, int]], seed: int, size: int = 64) -> bytes:
    """One PNG of the concept: the same object at a slightly different place and size each time."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(img)
    r = 18 + seed % 5
    cx, cy = 32 + (seed * 7) % 9 - 4, 32 + (seed * 5) % 9 - 4
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        for i, x in enumerate(range(box[0], box[2], 6)):  # vertical stripes in two colours
            d.rectangle((x, box[1], min(x + 5, box[2]), box[3]), fill=colors[i % 2])
    else:
        d.pieslice(box, 180, 360, fill=colors[0])  # top half one colour, bottom half the other
        d.pieslice(box, 0, 180, fill=colors[1])
        inner = r // 2
        d.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=(235, 235, 225))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _run(args: argparse.Namespace) -> int:
    from customdiff.client import Client
    from customdiff.local import start_serve
    from customdiffusion.v1 import trainer_service_pb2 as tpb

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"times_s": {}, "concepts": {}}
    t0 = time.perf_counter()
    # 1. The whole stack, on loopback.
    proc, ports = start_serve(out, api_keys=f"{API_KEY}=demo", max_concurrent_jobs=2)
    summary["times_s"]["start_stack"] = round(time.perf_counter() - t0, 1)
    client = Client(*(f"127.0.0.1:{ports[c]}" for c in ("trainer", "merger", "inference")), api_key=API_KEY)
    try:
        _scenario(client, tpb, out, args.steps, summary)
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)
    summary["times_s"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


def _scenario(client, tpb, out: Path, steps: int, summary: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # 2. Train both concepts at once, with live progress.
    def train(name: str):
        spec = CONCEPTS[name]
        images = [tpb.ImageInput(data=draw(spec["shape"], spec["colors"], seed)) for seed in range(4)]
        concept = tpb.ConceptSpec(name=name, class_prompt=spec["class_prompt"], images=images, num_class_images=8)
        hyper = tpb.Hyperparameters(resolution=64, max_train_steps=steps, learning_rate=1e-4, train_batch_size=2)

        def show(event):
            p = event.training_job.progress
            if event.log_line and '"progress"' in event.log_line and p.step % 10 == 0:
                print(f"  [{name}] step {p.step}/{p.total_steps} loss {p.loss:.4f} {p.images_per_second:.1f} img/s "
                      f"eta {p.eta_seconds:.0f}s", flush=True)
        t = time.perf_counter()
        job = client.train([concept], hyperparameters=hyper, request_id=f"demo-{name}", on_event=show)
        summary["times_s"][f"train_{name}"] = round(time.perf_counter() - t, 1)
        return job

    print("training two concepts through TrainerService ...", flush=True)
    with ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(train, CONCEPTS))
    # 3. Merge, then compress the merge (the paper's top 60%).
    t = time.perf_counter()
    merged = client.merge(list(CONCEPTS), concept_name="square-and-ring")
    summary["times_s"]["merge"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    compressed = client.compress("square-and-ring", fraction=0.6, concept_name="square-and-ring-top60")
    summary["times_s"]["compress"] = round(time.perf_counter() - t, 1)
    for job in jobs + [merged, compressed]:
        c = job.concept
        summary["concepts"][c.name] = {"version": c.version, "digest": c.digest, "tokens": list(c.tokens),
                                       "bytes": c.size_bytes}
    summary["merge_report"] = {k: round(v, 6) for k, v in merged.report.summary.items()}
    # 4. Generate with each concept, the merge and its compression; plus the base for comparison.
    prompts = [("base", [], "photo of a square"),
               ("striped-square", ["striped-square"], "photo of a <new1> square"),
               ("two-tone-ring", ["two-tone-ring"], "photo of a <new1> ring"),
               ("merged", ["square-and-ring"], "photo of a <new1> square and a <new2> ring"),
               ("compressed", ["square-and-ring-top60"], "photo of a <new1> square and a <new2> ring")]
    images = []
    t = time.perf_counter()
    for label, names, prompt in prompts:
        response = client.generate(prompt, concepts=names, num_images=2, num_inference_steps=25, seed=0,
                                   height=64, width=64, guidance_scale=5.0)
        for i, image in enumerate(response.images):
            (out / f"{label}-{i}.png").write_bytes(image.png)
            images.append((label, image.png))
    summary["times_s"]["generate_10_images"] = round(time.perf_counter() - t, 1)
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
