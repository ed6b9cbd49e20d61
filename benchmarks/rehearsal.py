"""Real-size rehearsal on the CPU: every stage of the system on a base with SD-1.5's shapes and random weights.

Nothing is downloaded: the base is built from SD-1.5's configs (benchmarks/train_throughput.py), saved
in fp16 with `save_pretrained` and loaded through the same `from_pretrained(dir)` path a real checkpoint
takes. Each stage runs in its own process so that its peak RSS is its own:

1. build: build and save the base; load it as the Triton model does (`Engine.from_paths`);
2. train: `python -m trainer`'s job, 2 steps at 128 px with 2 generated class images of that size;
   the artifact's size at full rank;
3. merge: merge 3 full-rank concepts, compress the merge to the top 60%; the sizes;
4. cold_load: a concept's read, verify and decode at real size (full rank and compressed);
5. onnx: `customdiff export-onnx` of the full-size UNet (external data), `onnx.checker` on it, the
   graph's K/V input widths;
6. serve: `customdiff serve` (inference front + a real tritonserver) on the base: model-load time, one
   512 px image, then 8 images of 512 px in one Generate through the gRPC API (message limits), and
   the Triton process tree's peak RSS.

Prints progress to stderr and one JSON line last: {"family", "stages": {stage: {"seconds", "peak_rss_mb",
...}}}. SDXL needs the SDXL model family (issue 17); until then `--family sdxl` says so and exits 2.

Usage: python benchmarks/rehearsal.py [--family sd15] [--work DIR] [--stages build,train,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

STAGES = ("build", "train", "merge", "cold_load", "onnx", "serve")
RESOLUTION = {"sd15": 512}
TRAIN_RESOLUTION = {"sd15": 128}
API_KEY = "rehearsal-key"
# A 512 px Generate of 8 images (16 UNet rows with guidance) takes minutes on 2 CPU cores: more than
# the client's default 300 s deadline.
GENERATE_TIMEOUT_S = 1800.0


def log(message: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS (VmHWM) of a process and its descendants, from /proc."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            # Every thread's children: tritonserver is started from a supervisor thread.
            children = [c for task in Path(f"/proc/{p}/task").iterdir() for c in (task / "children").read_text().split()]
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0) / 1024
        todo += [int(c) for c in children]
    return total


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# Stages: each runs in its own process and returns its figures --------------------------------------


def stage_build(work: Path, family: str) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionPipeline

    from concepts.tiny import _scheduler, _tokenizer
    from concepts.tokenizer_files import write_clip_tokenizer_files
    from engine.engine import Engine
    from train_throughput import sd15_base

    started = time.perf_counter()
    tokenizer_dir = work / "tokenizer"
    write_clip_tokenizer_files(tokenizer_dir)
    parts = sd15_base(tokenizer_dir, torch.device("cpu"))
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=_tokenizer(),
                                   unet=parts.unet, scheduler=_scheduler(family), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    built = time.perf_counter()
    pipe.save_pretrained(work / "base", safe_serialization=True)
    write_clip_tokenizer_files(work / "base" / "tokenizer")
    saved = time.perf_counter()
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    del pipe, parts
    engine = Engine.from_paths(work / "base", str(work / "store"))
    loaded = time.perf_counter()
    return {"build_s": built - started, "save_s": saved - built, "load_s": loaded - saved,
            "unet_params_m": unet_params / 1e6, "base_on_disk_mb": dir_mb(work / "base"),
            "kv_layers": len(engine.layer_shapes)}


def stage_train(work: Path, family: str) -> dict[str, Any]:
    from train_throughput import write_images

    from concepts.store import ArtifactStore
    from trainer.__main__ import main as trainer_main

    size = TRAIN_RESOLUTION[family]
    images = write_images(work / "train-images", 2, size, seed=1)
    spec = {"base_model": str(work / "base"), "store_url": str(work / "store"), "work_dir": str(work / "job"),
            "class_image_cache_dir": str(work / "class-images"), "device": "cpu",
            "concepts": [{"name": "rehearsal", "class_prompt": "dog", "images": images, "num_class_images": 2}],
            "hyperparameters": {"max_train_steps": 2, "resolution": size, "train_batch_size": 1,
                                "class_image_steps": 2, "views_per_image": 1}}
    (work / "spec.json").write_text(json.dumps(spec))
    code = trainer_main(["--spec", str(work / "spec.json")])
    if code != 0:
        raise RuntimeError(f"the trainer exited with {code}; see {work / 'job'}")
    digest = json.loads((work / "job" / "result.json").read_text())["digest"]
    (work / "trained.digest").write_text(digest)
    return {"resolution": size, "steps": 2, "artifact_mb": len(ArtifactStore(str(work / "store")).get(digest)) / 2**20}


def _random_concept(base, seed: int, token: str):
    """A full-rank concept on every K/V layer of `base` (what a trained SD-1.5 concept weighs)."""
    import torch

    from concepts.artifact import Concept, LinearDelta
    from concepts.base import kv_layers

    g = torch.Generator().manual_seed(seed)
    deltas = {name: LinearDelta(dense=0.01 * torch.randn(tuple(layer.weight.shape), generator=g))
              for name, layer in kv_layers(base.unet).items()}
    hidden = base.text_encoder.get_input_embeddings().weight.shape[1]
    return Concept(deltas=deltas, tokens=(token,), embeddings=torch.randn(1, hidden, generator=g),
                   base_fingerprint=base.fingerprint, class_words=("dog",), provenance={"kind": "rehearsal"})


def stage_merge(work: Path, family: str) -> dict[str, Any]:
    import torch

    from concepts.base import load_base
    from concepts.store import ArtifactStore
    from merger.run import compress_concept, merge_concepts

    store = ArtifactStore(str(work / "store"))
    base = load_base(work / "base")
    trained = store.get_concept((work / "trained.digest").read_text())
    concepts = [trained] + [_random_concept(base, seed, f"<new{seed}>") for seed in (2, 3)]
    started = time.perf_counter()
    merged, _ = merge_concepts(base, concepts)
    merged_s = time.perf_counter() - started
    merged_digest = store.put_concept(merged)
    started = time.perf_counter()
    compressed, _ = compress_concept(merged, dtype=torch.float16, fraction=0.6)
    compress_s = time.perf_counter() - started
    compressed_digest = store.put_concept(compressed)
    (work / "merged.digest").write_text(merged_digest)
    (work / "compressed.digest").write_text(compressed_digest)
    return {"merge_s": merged_s, "compress_s": compress_s,
            "merged_mb": len(store.get(merged_digest)) / 2**20,
            "compressed_top60_mb": len(store.get(compressed_digest)) / 2**20}


def stage_cold_load(work: Path, family: str) -> dict[str, Any]:
    from concepts.artifact import concept_from_bytes
    from concepts.store import ArtifactStore

    store = ArtifactStore(str(work / "store"))
    out: dict[str, Any] = {}
    for name in ("trained", "merged", "compressed"):
        digest = (work / f"{name}.digest").read_text()
        started = time.perf_counter()
        data = store.get(digest)  # read and verify (sha256)
        read = time.perf_counter()
        concept_from_bytes(data)  # decode
        out[f"{name}_mb"] = len(data) / 2**20
        out[f"{name}_read_verify_ms"] = (read - started) * 1e3
        out[f"{name}_decode_ms"] = (time.perf_counter() - read) * 1e3
    return out


def stage_onnx(work: Path, family: str) -> dict[str, Any]:
    import onnx

    out = work / "onnx"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "customdiff", "export-onnx", str(work / "base"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    exported = time.perf_counter() - started
    unet = out / "unet" / "1" / "model.onnx"
    onnx.checker.check_model(str(unet))  # a path: the checker reads the external data too
    graph = onnx.load(str(unet), load_external_data=False).graph
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    return {"export_s": exported, "export_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "unet_onnx_mb": dir_mb(unet.parent), "unet_graph_mb": unet.stat().st_size / 2**20,
            "checker": "passed", "inputs": inputs}


def stage_serve(work: Path, family: str) -> dict[str, Any]:
    from customdiff.local import start_serve
    from customdiff_client import Client

    started = time.perf_counter()
    proc, ports = start_serve(work / "serve", f"{API_KEY}=rehearsal", only=("inference", "triton"),
                              base_model=str(work / "base"), store_url=str(work / "store"),
                              database_url=f"sqlite:///{work}/serve/registry.db")
    ready_s = time.perf_counter() - started
    target = f"127.0.0.1:{ports['inference']}"
    size = RESOLUTION[family]
    try:
        with Client(target, target, target, api_key=API_KEY) as client:
            started = time.perf_counter()
            one = client.generate("a photo of a dog", num_inference_steps=2, width=size, height=size,
                                  num_images=1, timeout=GENERATE_TIMEOUT_S).images
            first_s = time.perf_counter() - started
            started = time.perf_counter()
            eight = client.generate("a photo of a dog", num_inference_steps=2, width=size, height=size,
                                    num_images=8, timeout=GENERATE_TIMEOUT_S).images
            eight_s = time.perf_counter() - started
        triton_mb = tree_peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(120)
    return {"ready_s": ready_s, "first_request_s": first_s, "first_images": len(one),
            "eight_images_s": eight_s, "eight_images": len(eight), "eight_png_mb": sum(len(i.png) for i in eight) / 2**20,
            "serve_tree_peak_rss_mb": triton_mb, "resolution": size, "steps": 2}


STAGE_FUNCTIONS: dict[str, Callable[[Path, str], dict[str, Any]]] = {
    "build": stage_build, "train": stage_train, "merge": stage_merge, "cold_load": stage_cold_load,
    "onnx": stage_onnx, "serve": stage_serve}


def run_stage(name: str, work: Path, family: str) -> dict[str, Any]:
    """Run one stage in a child process of this script; its figures plus seconds and peak RSS."""
    log(f"stage {name} ...")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--family", family, "--work", str(work), "--stage", name],
                          stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        log(f"stage {name} failed (exit {proc.returncode})")
        return {"seconds": seconds, "error": f"exit {proc.returncode}; see the stage's stderr above"}
    result = dict(json.loads(lines[-1]), seconds=seconds)
    log(f"stage {name}: {result}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one stage, in this process
    args = parser.parse_args()
    if args.family == "sdxl":
        print("the SDXL rehearsal needs the SDXL model family (issue 17), which has not landed", file=sys.stderr)
        return 2
    if args.stage:
        result = STAGE_FUNCTIONS[args.stage](Path(args.work), args.family)
        print(json.dumps(dict(result, peak_rss_mb=peak_rss_mb())))
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="customdiff-rehearsal-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        stages = {name: run_stage(name, work, args.family) for name in args.stages.split(",")}
    print(json.dumps({"family": args.family, "load_avg_1m": os.getloadavg()[0], "stages": stages}))
    return 0 if not any("error" in s for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
