"""The markdown rows `gpu_suite.py` prints for benchmarks/RESULTS.md, one per table, from its report."""

from __future__ import annotations


def _cells(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _failed(entry: dict) -> str:
    return f"{entry['status']}: {entry.get('error', '')}".rstrip(": ").replace("|", "/")


def _train(card: str, model: str, entry: dict) -> str:
    r = entry.get("result")
    if r is None:
        return _cells(card, model, "", "", "", _failed(entry), "", "", "", "")
    return _cells(card, model, r["resolution"], r["images_per_step"], r["precision"], r["images_per_s"],
                  r["baseline_images_per_s"], r["speedup"],
                  f"{r['peak_mb']:.0f} / {r['baseline_peak_mb']:.0f}",
                  f"{r['s_per_250_steps']} s (extrapolated from {r['timed_steps']} steps)")


def _onnx(card: str, model: str, entry: dict) -> str:
    r = entry.get("result")
    if r is None:
        return _cells(card, model, _failed(entry))
    provider = "CUDA provider" if "CUDAExecutionProvider" in r["providers"] else "CPU provider"
    return _cells(f"{card}, onnxruntime {r['onnxruntime']} ({provider}), peak {entry['peak_mb']:.0f} MB",
                  model, f"{r['onnx_vs_torch']:.3f}")


def _serving(card: str, model: str, entry: dict) -> str:
    r = entry.get("result")
    if r is None:
        return _cells(card, model, _failed(entry), "", "", "", "", "")
    return _cells(f"{card}, peak {entry['peak_mb']:.0f} MB", f"engine, {model}, {r['steps']} steps",
                  f"{r['overhead_single']:.3f}", f"{r['overhead_mixed']:.3f}",
                  f"{r['cold_swap_ms']:.2f} ({r['artifact_read_ms']:.2f})", f"{r['batching_gain']:.2f}",
                  f"{r['vs_diffusers']:.2f}", r["concepts_per_gb"])


def _arrivals(card: str, model: str, entry: dict) -> str:
    r = entry.get("result")
    if r is None:
        return _cells(f"{card}, {model}", "", _failed(entry), "", "", "", "", "", "", "")
    req, step = r["request"], r["step"]
    mix = "/".join(map(str, r["mix_steps"]))
    return _cells(f"{card}, {model}, {mix}-step mix, peak {entry['peak_mb']:.0f} MB",
                  f"{r['duration_s']:g} s", f"{r['capacity_rps']:.2f}", f"{r['offered_load']:.0%}",
                  r["requests"],
                  f"{req['p50_s']} / {req['p95_s']}", f"{step['p50_s']} / {step['p95_s']}",
                  f"{req['throughput_rps']} / {step['throughput_rps']}", f"{r['p95_ratio']:.3f}",
                  f"{r['throughput_ratio']:.3f}")


TABLES = {
    "train": ("Training throughput", _train),
    "serving": ("Serving", _serving),
    "arrivals": ("Step-level vs request-level batching", _arrivals),
    "onnx": ("ONNX UNet in the engine", _onnx),
}


def markdown_rows(report: dict) -> list[str]:
    """A summary table of the parts, then per part the row for its RESULTS.md section (named above it)."""
    card = report["device"]
    config = report["config"]
    size = f"{config['resolution']}x{config['resolution']}"
    model = f"SD-1.5 shapes, {size}" if config["model"] == "sd15" else f"tiny base, {size}"
    rows = [f"GPU suite on {card} (torch {report['torch']}):", "",
            _cells("part", "status", "seconds", "limit s", "peak MB", "memory"),
            _cells(*["---"] * 6)]
    for name, entry in report["parts"].items():
        rows.append(_cells(name, _failed(entry) if entry["status"] != "ok" else "ok", entry["seconds"],
                           entry["limit_s"], entry.get("peak_mb", ""), entry.get("memory", "")))
    for name, entry in report["parts"].items():
        title, row = TABLES[name]
        rows += ["", f"{title} ({name}):", row(card, model, entry)]
    return rows
