"""Real-size rehearsal on the CPU: every stage of the system on SD-1.5- or SDXL-shaped bases with random weights.

Nothing is downloaded: the base is built from the family's real configs (SD-1.5's in
benchmarks/train_throughput.py, stabilityai/stable-diffusion-xl-base-1.0's below), saved in fp16 with
`save_pretrained` and loaded through the same `from_pretrained(dir)` path a real checkpoint takes. Each
stage runs in its own process so that its peak RSS is its own:

1. build: build and save the base; load it as the Triton model does (`Engine.from_paths`);
2. train: `python -m trainer`'s job, 2 steps at 128 px (SDXL: 256 px) with 2 generated class images of
   that size; the artifact's size at full rank;
3. merge: merge 3 full-rank concepts, compress the merge to the top 60%; the sizes;
4. cold_load: a concept's read, verify and decode at real size (full rank, merged and compressed);
5. onnx: `customdiff export-onnx` of the full-size base (external data), `onnx.checker` on the UNet, the
   graph's inputs (SDXL's text_embeds and time_ids too) and the packed K/V width from its metadata;
6. serve: `customdiff serve` (inference front + a real tritonserver) on the base: model-load time, one
   512 px (SDXL: 1024 px) image, then `--serve-images` (8) of that size in one Generate through the gRPC
   API (message limits: the PNG bytes, or the limit error), and the Triton process tree's peak RSS;
   `--serve-steps` (2) and `--serve-guidance` (7.5) apply to both Generates.

Memory: before starting a stage the parent compares its estimated peak (`PEAK_GIB`) with the machine's
MemAvailable and records {"skipped": reason} for a stage that would not fit. Stages run with
oom_score_adj 1000: should an estimate fall short, the kernel ends the stage rather than other work on
the machine.

SDXL on this machine (2 CPU cores, 24 GB = 23 GiB, no swap), measured 2026-12-02 (RESULTS.md). Every
stage loads the base in float32, as the system does: UNet 2,567M parameters (70 attn2 layers, whose 140
K/V projections hold 340.8M), text encoders 123M + 695M, VAE 84M: 3,469M, 12.9 GiB in float32, 6.6 GB on
disk. Without `accelerate` installed, `from_pretrained` builds each model with random weights and then
copies the fp16 state dict in, so loading peaks at 14.3 GiB (the UNet's).

  stage      peak RSS  time     notes
  build      15.2 GB   75 s     float32 build, fp16 save, float32 load
  train      23.6 GB   143 s    float32 with gradient checkpointing (RSS counts the mmapped checkpoint);
                                the artifact 1.3 GB (full rank, float32)
  merge      20.5 GB   551 s    1,200 captions through both text encoders take most of it
  cold_load  2.8 GB    6 s      1.3 GB read, sha256, decode
  onnx       ~26 GiB   skipped  the base, the exporter's folded copies of the UNet's weights, then
                                `onnx.load`'s 10.3 GB copy of them: needs a machine with 32 GB
  serve      18.7 GB   780 s    ready 26 s; one 1024 px image with 2 steps 234 s (the engine decodes one
                                image at a time: a 1024 px decode holds ~3 GiB); `--serve-images 2
                                --serve-guidance 1` 515 s; 8 images take ~45 min

Prints progress to stderr and one JSON line last: {"family", "stages": {stage: {"seconds", "peak_rss_mb",
...} or {"skipped": reason}}}.

Usage: python benchmarks/rehearsal.py [--family sd15|sdxl] [--work DIR] [--stages build,train,...]
           [--serve-steps 2] [--serve-images 8] [--serve-guidance 7.5]
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
RESOLUTION = {"sd15": 512, "sdxl": 1024}
TRAIN_RESOLUTION = {"sd15": 128, "sdxl": 256}
# SDXL trains in float32 here with gradient checkpointing: the base (12.9 GiB) with the trained K/V's
# originals, gradients and AdamW moments leaves little room for activations. (bf16, which would halve the
# frozen weights, runs a matmul ~57x slower than float32 on this CPU, which has no bf16 instructions: a
# 2-step job would take hours.)
TRAIN_CHECKPOINTING = {"sd15": False, "sdxl": True}
# Estimated peak of each stage in GiB (module doc; SD-1.5's measured, RESULTS.md, its onnx estimated);
# the engine decodes one image at a time, so serve's does not grow with the images of a Generate.
PEAK_GIB = {"sd15": {"build": 5.5, "train": 5.5, "merge": 5.5, "cold_load": 0.5, "onnx": 10.0, "serve": 6.5},
            "sdxl": {"build": 15.5, "train": 20.0, "merge": 19.0, "cold_load": 3.0, "onnx": 26.0, "serve": 17.5}}
API_KEY = "rehearsal-key"
# A 512 px Generate of 8 images (16 UNet rows with guidance) takes minutes on 2 CPU cores, one of 8
# 1024 px SDXL images about 45 minutes: more than the client's default 300 s deadline.
GENERATE_TIMEOUT_S = 3 * 3600.0

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, vae/config.json and text_encoder_2/config.json,
# abridged. Its text_encoder is CLIP ViT-L, SD-1.5's (train_throughput.SD15_TEXT); both text configs
# keep the placeholder token ids they were published with (eos 2: `concepts.conditioning` pools anyway).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_TEXT_2 = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
               "projection_dim": 1280}
SDXL_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def log(message: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_gib() -> float:
    """The kernel's MemAvailable: what can be allocated without swapping or killing."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable")) / 2**20


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


def sdxl_modules() -> tuple[Any, Any, Any, Any]:
    """SDXL's UNet, VAE, text encoder and text encoder 2 with random weights, on torch's default device
    (under ``with torch.device("meta")`` they take no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from train_throughput import SD15_TEXT

    torch.manual_seed(0)
    return (UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE),
            CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **SDXL_TOKEN_IDS)),
            CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2, **SDXL_TOKEN_IDS)))


def base_pipeline(family: str, work: Path):
    """The family's diffusers pipeline: real shapes, random weights, float32, the tiny base's tokenizers."""
    import torch

    from concepts.tiny import SD2_PAD_TOKEN, _scheduler, _tokenizer

    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        unet, vae, text_encoder, text_encoder_2 = sdxl_modules()
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_tokenizer(),
            tokenizer_2=_tokenizer(pad_token=SD2_PAD_TOKEN), unet=unet, scheduler=_scheduler(family),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    from diffusers import StableDiffusionPipeline

    from concepts.tokenizer_files import write_clip_tokenizer_files
    from train_throughput import sd15_base

    write_clip_tokenizer_files(work / "tokenizer")
    parts = sd15_base(work / "tokenizer", torch.device("cpu"))
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=_tokenizer(),
                                   unet=parts.unet, scheduler=_scheduler(family), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


# Stages: each runs in its own process and returns its figures --------------------------------------


def stage_build(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    from concepts.tokenizer_files import write_clip_tokenizer_files
    from engine.engine import Engine

    started = time.perf_counter()
    pipe = base_pipeline(args.family, work)
    pipe.to(torch.float16)
    built = time.perf_counter()
    pipe.save_pretrained(work / "base", safe_serialization=True)
    for name in [name for name in pipe.components if name.startswith("tokenizer")]:
        write_clip_tokenizer_files(work / "base" / name)  # CLIP's BPE files, as in a real directory
    saved = time.perf_counter()
    params = {name: sum(p.numel() for p in module.parameters()) / 1e6
              for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    del pipe
    dtypes = set()
    for path in (work / "base").rglob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes.update(f.get_slice(key).get_dtype() for key in f.keys())
    engine = Engine.from_paths(work / "base", str(work / "store"))
    loaded = time.perf_counter()
    return {"family": engine.base.family, "build_s": built - started, "save_s": saved - built,
            "load_s": loaded - saved, "params_m": params, "base_on_disk_mb": dir_mb(work / "base"),
            "dtypes_on_disk": sorted(dtypes), "kv_layers": len(engine.layer_shapes)}


def stage_train(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from train_throughput import write_images

    from concepts.store import ArtifactStore
    from trainer.__main__ import main as trainer_main

    size = TRAIN_RESOLUTION[args.family]
    images = write_images(work / "train-images", 2, size, seed=1)
    spec = {"base_model": str(work / "base"), "store_url": str(work / "store"), "work_dir": str(work / "job"),
            "class_image_cache_dir": str(work / "class-images"), "device": "cpu",
            "concepts": [{"name": "rehearsal", "class_prompt": "dog", "images": images, "num_class_images": 2}],
            "hyperparameters": {"max_train_steps": 2, "resolution": size, "train_batch_size": 1,
                                "gradient_accumulation_steps": 1,
                                "class_image_steps": 2, "views_per_image": 1,
                                "gradient_checkpointing": TRAIN_CHECKPOINTING[args.family]}}
    (work / "spec.json").write_text(json.dumps(spec))
    code = trainer_main(["--spec", str(work / "spec.json")])
    if code != 0:
        raise RuntimeError(f"the trainer exited with {code}; see {work / 'job'}")
    digest = json.loads((work / "job" / "result.json").read_text())["digest"]
    (work / "trained.digest").write_text(digest)
    return {"resolution": size, "steps": 2, "artifact_mb": len(ArtifactStore(str(work / "store")).get(digest)) / 2**20}


def _random_concept(base, seed: int, token: str):
    """A full-rank concept on every K/V layer of `base` (what a trained one weighs), rows for each text encoder."""
    import torch

    from concepts.artifact import Concept, LinearDelta
    from concepts.base import kv_layers

    g = torch.Generator().manual_seed(seed)
    deltas = {name: LinearDelta(dense=0.01 * torch.randn(tuple(layer.weight.shape), generator=g))
              for name, layer in kv_layers(base.unet).items()}
    rows = [torch.randn(1, encoder.get_input_embeddings().weight.shape[1], generator=g)
            for _, encoder in base.text_pairs]
    return Concept(deltas=deltas, tokens=(token,), embeddings=rows[0],
                   embeddings_2=rows[1] if len(rows) > 1 else None, family=base.family,
                   base_fingerprint=base.fingerprint, class_words=("dog",), provenance={"kind": "rehearsal"})


def stage_merge(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from concepts.base import load_base
    from concepts.store import ArtifactStore
    from merger.run import compress_concept, merge_concepts

    store = ArtifactStore(str(work / "store"))
    base = load_base(work / "base")
    digests = [(work / "trained.digest").read_text()]
    digests += [store.put_concept(_random_concept(base, seed, f"<new{seed}>")) for seed in (2, 3)]
    concepts = [store.get_concept(digest) for digest in digests]  # as the merger service reads them
    started = time.perf_counter()
    merged, _ = merge_concepts(base, concepts, parents=digests)
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


def stage_cold_load(work: Path, args: argparse.Namespace) -> dict[str, Any]:
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


def stage_onnx(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from engine.onnx_unet import META_ADDED, META_LAYOUT, read_metadata

    out = work / "onnx"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "customdiff", "export-onnx", str(work / "base"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    exported = time.perf_counter() - started
    unet = out / "unet" / "1" / "model.onnx"
    onnx.checker.check_model(str(unet))  # a path: the checker reads the external data too
    graph = onnx.load(str(unet), load_external_data=False).graph
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    metadata = read_metadata(unet)
    layout = json.loads(metadata[META_LAYOUT])  # [path, heads, head_dim] per attn2 layer
    return {"export_s": exported, "export_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "onnx_mb": {model.name: dir_mb(model) for model in sorted(out.iterdir()) if model.is_dir()},
            "unet_graph_mb": unet.stat().st_size / 2**20, "checker": "passed", "inputs": inputs,
            "added_conditions": json.loads(metadata.get(META_ADDED, "[]")), "kv_layers": len(layout),
            "kv_width": sum(heads * head_dim for _, heads, head_dim in layout)}


def stage_serve(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from customdiff_client import CallError, Client

    from customdiff.local import start_serve

    size = RESOLUTION[args.family]
    fields = {"num_inference_steps": args.serve_steps, "guidance_scale": args.serve_guidance, "width": size,
              "height": size, "timeout": GENERATE_TIMEOUT_S}
    out: dict[str, Any] = {"resolution": size, "steps": args.serve_steps, "guidance": args.serve_guidance}
    started = time.perf_counter()
    proc, ports = start_serve(work / "serve", f"{API_KEY}=rehearsal", only=("inference", "triton"),
                              base_model=str(work / "base"), store_url=str(work / "store"),
                              database_url=f"sqlite:///{work}/serve/registry.db")
    out["ready_s"] = time.perf_counter() - started
    target = f"127.0.0.1:{ports['inference']}"
    try:
        with Client(target, target, target, api_key=API_KEY) as client:
            started = time.perf_counter()
            one = client.generate("a photo of a dog", num_images=1, **fields).images
            out.update(first_request_s=time.perf_counter() - started, first_images=len(one),
                       first_png_mb=len(one[0].png) / 2**20)
            started = time.perf_counter()
            batch = client.generate("a photo of a dog", num_images=args.serve_images, **fields).images
            out.update(batch_s=time.perf_counter() - started, batch_images=len(batch),
                       batch_png_mb=sum(len(i.png) for i in batch) / 2**20, limit_error=False)
    except CallError as e:  # the stage's failure, recorded: a message limit shows as RESOURCE_EXHAUSTED
        out.update(error=str(e), limit_error=e.status == grpc.StatusCode.RESOURCE_EXHAUSTED)
    finally:
        out["serve_tree_peak_rss_mb"] = tree_peak_rss_mb(proc.pid)
        proc.terminate()
        proc.wait(120)
    return out


STAGE_FUNCTIONS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "build": stage_build, "train": stage_train, "merge": stage_merge, "cold_load": stage_cold_load,
    "onnx": stage_onnx, "serve": stage_serve}


def run_stage(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage in a child process of this script: its figures, seconds and peak RSS; or why it did not run."""
    need, available = PEAK_GIB[args.family][name], available_gib()
    if need > available:
        log(f"stage {name} skipped: needs ~{need:.1f} GiB, {available:.1f} GiB available")
        return {"skipped": f"needs ~{need:.1f} GiB (estimate, module doc), {available:.1f} GiB available"}
    log(f"stage {name} ...")
    started = time.perf_counter()
    serve = ["--serve-steps", str(args.serve_steps), "--serve-images", str(args.serve_images),
             "--serve-guidance", str(args.serve_guidance)]
    proc = subprocess.run([sys.executable, __file__, "--family", args.family, "--work", str(work), "--stage", name,
                           *serve], stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        killed = " (SIGKILL: out of memory?)" if proc.returncode == -9 else ""
        log(f"stage {name} failed (exit {proc.returncode}){killed}")
        return {"seconds": seconds, "error": f"exit {proc.returncode}{killed}; see the stage's stderr above"}
    result = dict(json.loads(lines[-1]), seconds=seconds)
    log(f"stage {name}: {result}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(RESOLUTION), default="sd15")
    parser.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    parser.add_argument("--serve-steps", type=int, default=2, help="denoising steps of each serve Generate")
    parser.add_argument("--serve-images", type=int, default=8, help="images of serve's second Generate")
    parser.add_argument("--serve-guidance", type=float, default=7.5,
                        help="guidance of each serve Generate (1: no classifier-free guidance, half the rows)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one stage, in this process
    args = parser.parse_args()
    if args.stage:
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")  # the first to go, with its children
        except OSError:
            pass
        result = STAGE_FUNCTIONS[args.stage](Path(args.work), args)
        print(json.dumps(dict(result, peak_rss_mb=peak_rss_mb())))
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="customdiff-rehearsal-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        stages = {name: run_stage(name, work, args) for name in args.stages.split(",")}
    print(json.dumps({"family": args.family, "load_avg_1m": os.getloadavg()[0], "stages": stages}))
    return 0 if not any("error" in s for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
