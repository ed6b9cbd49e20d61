"""Every GPU row of benchmarks/RESULTS.md in one command, within a time budget (a lent GPU has minutes).

    python benchmarks/gpu_suite.py [--budget 420] [--parts train,serving,arrivals,onnx] [--out FILE]
    python benchmarks/gpu_suite.py --dry-run [--out FILE]

On a CUDA machine, at Stable Diffusion 1.5's shapes with random weights (nothing downloaded), each part
being the existing benchmark's own functions:

  train     `train_throughput.compare`: 512 px, 8 images a step, bf16 against the fp32 reference loop;
            a timed subset of steps, its `s_per_250_steps` extrapolated (labelled so)
  serving   `serving.measure`: overhead_single/mixed, cold swap, batching_gain, vs_diffusers (the diffusers
            pipeline on the same card and dtype), 8 requests at 512x512 in float16
  arrivals  `serving.poisson`: open-loop arrivals, request- against step-level batching, p50/p95 (wall clock)
  onnx      `serving.onnx_vs_torch` through onnxruntime's CUDA provider (onnxruntime-gpu); without it the
            row says it is not installed (the CPU provider at 512 px would only burn the budget)

Each part runs under its own time limit (the smaller of its share and what is left of --budget), in
try/except: a missing package, an error or the limit is recorded in its entry and the next part runs;
a part with too little budget left is skipped and says so. Per part: status, seconds, peak memory
(`torch.cuda.max_memory_allocated`; on the CPU the process's peak RSS so far). The JSON is written
after every part (so a run killed from outside keeps what finished) to --out, by default
$OUT/gpu_suite.json when OUT is set (the device tool returns what is written there), else
benchmarks/gpu_suite.json. Stdout: the markdown rows for RESULTS.md, then the JSON on one line, last.

--dry-run: prints the GPU plan (each part's shapes, steps and time limit), then runs every part at
tiny size on this machine (the tiny base, 64 px, 2-3 steps) so that each code path runs; its numbers
mean nothing. What to carry to a GPU machine and how: "When a GPU is lent" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The checkout is not installed on a lent GPU machine; serving.py and train_throughput.py sit beside this.
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_rows import markdown_rows  # noqa: E402

PARTS = ("train", "serving", "arrivals", "onnx")
# Packages each part imports (the GPU machine lacks some: they travel as wheels).
REQUIRES = {"train": ("diffusers", "transformers"),
            "serving": ("diffusers", "transformers", "opentelemetry"),
            "arrivals": ("diffusers", "transformers", "opentelemetry"),
            "onnx": ("diffusers", "transformers", "opentelemetry", "onnx", "onnxruntime")}


@dataclass(frozen=True)
class SuiteConfig:
    """What the parts run: the GPU sizes (`GPU`) or the dry run's (`DRY`)."""

    model: str  # "sd15" (random SD-1.5-shaped weights) or "tiny"
    device: str
    dtype: torch.dtype  # serving's (the ONNX comparison is float32, as the export is)
    resolution: int
    train_batch: int
    train_steps: int
    train_warmup: int
    serve_steps: int
    rounds: int
    mix_steps: tuple[int, ...]  # arrivals: each request's steps, drawn evenly
    duration_s: float  # arrivals: seconds of arrivals per batching mode
    load: float  # arrivals: offered load, a fraction of the capacity measured first
    rate: float | None = None  # arrivals: a fixed rate instead (the dry run's: a seeded, so fixed, count)
    limits_s: dict[str, float] = field(default_factory=dict)
    min_part_s: float = 20.0  # a part with less budget left than this is skipped

    def __post_init__(self) -> None:
        if self.model not in ("sd15", "tiny"):
            raise ValueError(f"model must be 'sd15' or 'tiny', got {self.model!r}")
        if set(self.limits_s) != set(PARTS):
            raise ValueError(f"limits_s must name {list(PARTS)}, got {sorted(self.limits_s)}")


GPU = SuiteConfig("sd15", "cuda", torch.float16, 512, 8, 30, 3, 25, 3, (20, 50), 30.0, 0.7,
                  limits_s={"train": 120, "serving": 110, "arrivals": 130, "onnx": 60})
DRY = SuiteConfig("tiny", "cpu", torch.float32, 64, 2, 2, 1, 2, 1, (2, 3), 1.0, 0.7, rate=8.0,
                  limits_s={"train": 60, "serving": 60, "arrivals": 60, "onnx": 60}, min_part_s=5.0)


def describe(config: SuiteConfig) -> dict[str, str]:
    """One line per part: what it measures at `config`'s sizes."""
    model = "SD-1.5 shapes, random weights" if config.model == "sd15" else "tiny base"
    px, dtype = f"{config.resolution}x{config.resolution}", str(config.dtype).removeprefix("torch.")
    return {
        "train": f"{model}, {config.resolution} px, {config.train_batch} images/step, ours (bf16 on CUDA) vs "
                 f"the fp32 reference loop; {config.train_steps} timed steps after {config.train_warmup} "
                 "warm-up, 250 steps extrapolated",
        "serving": f"{model}, 8 requests x {config.serve_steps} steps, {px}, {dtype}, rank-4 concepts: "
                   f"overhead, cold swap, batching gain, vs_diffusers; fastest of {config.rounds} rounds",
        "arrivals": f"{model}, {px}, {dtype}, Poisson arrivals at "
                    f"{f'{config.rate:g} rps' if config.rate else f'{config.load:.0%} of capacity'} for "
                    f"{config.duration_s:g} s per mode, {'/'.join(map(str, config.mix_steps))}-step mix: "
                    "request- vs step-level p50/p95",
        "onnx": f"{model}, exported UNet in onnxruntime (CUDA provider on a GPU) vs torch, float32, "
                f"8 requests x {config.serve_steps} steps, fastest of {config.rounds} rounds",
    }


class Missing(Exception):
    """A package a part needs is not installed."""


class PartTimeout(BaseException):
    """A part ran past its limit (a BaseException: the engine's `except Exception` must not swallow it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `PartTimeout` in this (the main) thread after `seconds`; CUDA calls return between kernels."""
    def expire(signum, frame):
        raise PartTimeout(f"ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Workspace:
    """Files the parts share, made on first use: a part that fails leaves the next one to make them."""

    def __init__(self, root: Path, config: SuiteConfig) -> None:
        self.root, self.config = root, config
        self._tiny: Path | None = None
        self._base: Path | None = None
        self._concepts: tuple | None = None

    def tiny(self) -> Path:
        """The tiny base (its tokenizer also serves the SD-1.5-shaped one)."""
        if self._tiny is None:
            from concepts.tiny import create_tiny_base

            self._tiny = create_tiny_base(self.root / "tiny")
        return self._tiny

    def base(self) -> Path:
        """The base directory the serving parts load: the tiny base, or random SD-1.5 shapes in float16."""
        if self._base is None:
            self._base = self.tiny() if self.config.model == "tiny" else write_sd15_base(
                self.root / "sd15", self.tiny() / "tokenizer", self.config.device)
        return self._base

    def concepts(self) -> tuple:
        """(store, base loaded on the CPU, the 8 rank-4 concepts, their digests), as serving.py makes them."""
        if self._concepts is None:
            from concepts.base import load_base
            from concepts.store import ArtifactStore
            from serving import N, compressed_concept

            store = ArtifactStore(str(self.root / "store"))
            base = load_base(self.base(), dtype=self.config.dtype)
            concepts = [compressed_concept(base, i, f"<c{i}>") for i in range(N)]
            self._concepts = (store, base, concepts, [store.put_concept(c) for c in concepts])
        return self._concepts


def write_sd15_base(directory: Path, tokenizer_dir: Path, device: str) -> Path:
    """`train_throughput.sd15_base`'s random components as a diffusers directory (float16, SD-1.5's PNDM)."""
    import shutil

    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from train_throughput import sd15_base

    base = sd15_base(tokenizer_dir, torch.device(device))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=base.vae.half(), text_encoder=base.text_encoder.half(),
                                   tokenizer=base.tokenizer, unet=base.unet.half(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    partial = directory.with_name(directory.name + ".partial")  # a part stopped mid-write leaves no half base
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    shutil.copytree(tokenizer_dir, partial / "tokenizer", dirs_exist_ok=True)  # BPE files, as the tiny base
    partial.rename(directory)
    return directory


def part_train(ws: Workspace, config: SuiteConfig) -> dict:
    from train_throughput import compare

    args = argparse.Namespace(steps=config.train_steps, warmup=config.train_warmup,
                              resolution=config.resolution, batch=config.train_batch, precision="")
    result = compare(config.model, torch.device(config.device), args, ws.tiny(), ws.root / "train")
    return {**result, "extrapolated": True, "timed_steps": config.train_steps}


def part_serving(ws: Workspace, config: SuiteConfig) -> dict:
    from engine.engine import Engine
    from serving import diffusers_way, measure

    store, base, concepts, digests = ws.concepts()
    diffusers = diffusers_way(ws.base(), concepts, config.serve_steps, config.device, config.dtype)
    engine = Engine.from_paths(ws.base(), store.url, device=config.device, dtype=config.dtype)
    result = measure(engine.generate_batch, engine.generate, store, base, digests, config.serve_steps,
                     config.rounds, diffusers, time.perf_counter)
    result["concepts_per_gb"] = int(1e9 // engine.cache.get(digests[0]).nbytes)
    return {**result, "steps": config.serve_steps, "rounds": config.rounds, "clock": "wall seconds"}


def part_arrivals(ws: Workspace, config: SuiteConfig) -> dict:
    from engine.engine import Engine
    from serving import N, poisson

    store, _, _, digests = ws.concepts()
    engine = Engine.from_paths(ws.base(), store.url, device=config.device, dtype=config.dtype)
    result = poisson(engine, digests, config.rate, config.load, config.duration_s, time.perf_counter, N, 1,
                     config.mix_steps)
    return {**result, "duration_s": config.duration_s, "mix_steps": list(config.mix_steps),
            "clock": "wall seconds"}


def part_onnx(ws: Workspace, config: SuiteConfig) -> dict:
    import onnxruntime as ort

    from engine.engine import Engine
    from serving import onnx_vs_torch

    providers = ort.get_available_providers()
    if config.device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise Missing(f"onnxruntime-gpu (onnxruntime {ort.__version__} here has only {providers})")
    store, _, _, digests = ws.concepts()
    engine = Engine.from_paths(ws.base(), store.url, device=config.device)
    ratio = onnx_vs_torch(engine, ws.base(), store.url, digests, config.serve_steps, config.rounds,
                          config.device)
    return {"onnx_vs_torch": ratio, "onnxruntime": ort.__version__, "providers": providers,
            "steps": config.serve_steps, "rounds": config.rounds}


RUNNERS: dict[str, Callable[[Workspace, SuiteConfig], dict]] = {
    "train": part_train, "serving": part_serving, "arrivals": part_arrivals, "onnx": part_onnx}


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def run_part(name: str, ws: Workspace, config: SuiteConfig, limit_s: float) -> dict:
    """One part under `limit_s`: its entry, whatever happened (the next part runs in any case)."""
    entry: dict = {"status": "ok", "limit_s": round(limit_s, 1)}
    missing = [p for p in REQUIRES[name] if not installed(p)]
    if missing:
        return {**entry, "status": "not installed", "error": f"missing {', '.join(missing)}", "seconds": 0.0}
    gc.collect()
    if config.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tf32 = torch.backends.cuda.matmul.allow_tf32  # the training baseline turns it off
    start = time.perf_counter()
    try:
        with time_limit(limit_s):
            entry["result"] = RUNNERS[name](ws, config)
    except Missing as e:
        entry.update(status="not installed", error=f"missing {e}")
    except ImportError as e:
        entry.update(status="not installed", error=f"missing {e.name or e}")
    except PartTimeout as e:
        entry.update(status="timed out", error=str(e))
    except Exception as e:  # noqa: BLE001 - recorded, and the suite goes on
        entry.update(status="failed", error=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc(limit=-6)[-3000:])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    entry["seconds"] = round(time.perf_counter() - start, 1)
    result = entry.get("result", {})
    # compare() resets the peak between its two runs; it reports each run's own.
    peak = max(peak_mb(config.device), result.get("peak_mb", 0), result.get("baseline_peak_mb", 0))
    entry["peak_mb"] = round(peak, 1)
    entry["memory"] = "torch.cuda.max_memory_allocated" if config.device == "cuda" else \
        "process peak RSS so far"
    return entry


def run_suite(config: SuiteConfig, parts: list[str], budget_s: float, out: Path, report: dict) -> dict:
    """Every part in turn within `budget_s`; `report` (written to `out` after each part) gains their entries.
    """
    deadline = time.monotonic() + budget_s
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp), config)
        for name in parts:
            left = deadline - time.monotonic()
            limit = min(config.limits_s[name], left)
            if limit < config.min_part_s:
                skipped = f"budget exhausted ({left:.0f} s left)"
                report["parts"][name] = {"status": "skipped", "error": skipped, "seconds": 0.0,
                                         "limit_s": round(max(limit, 0), 1)}
            else:
                print(f"[gpu_suite] {name}: up to {limit:.0f} s", file=sys.stderr, flush=True)
                report["parts"][name] = run_part(name, ws, config, limit)
            print(f"[gpu_suite] {name}: {report['parts'][name]['status']} "
                  f"({report['parts'][name]['seconds']} s)", file=sys.stderr, flush=True)
            write_report(out, report)
    return report


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out)


def default_out(env: dict[str, str]) -> Path:
    return Path(env["OUT"]) / "gpu_suite.json" if env.get("OUT") else ROOT / "benchmarks" / "gpu_suite.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the GPU plan, then run every part at tiny size on the CPU")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, help="the JSON file (default: $OUT/gpu_suite.json, else "
                        "benchmarks/gpu_suite.json)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run (tiny sizes on the CPU), or on a GPU machine")
    out = args.out or default_out(dict(os.environ))
    config = DRY if args.dry_run else GPU
    if args.dry_run:  # one thread: on a small shared machine more only spin against each other
        torch.set_num_threads(1)
        print("GPU plan (what a CUDA machine runs):")
        for name, line in describe(GPU).items():
            print(f"  {name:9} {line}; limit {GPU.limits_s[name]:.0f} s")
        print(f"  total budget {args.budget:.0f} s; dry run now, every part at: tiny base, "
              f"{DRY.resolution} px, {DRY.serve_steps}-{max(DRY.mix_steps)} steps, on the CPU")
    device = torch.cuda.get_device_name() if config.device == "cuda" else "CPU (dry run)"
    report = {"device": device, "dry_run": args.dry_run, "budget_s": args.budget, "torch": torch.__version__,
              "config": {**asdict(config), "dtype": str(config.dtype)}, "plan": describe(config), "parts": {}}
    run_suite(config, parts, args.budget, out, report)
    report["rows"] = markdown_rows(report)
    write_report(out, report)
    print("\n".join(report["rows"]))
    print(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    main()
