"""Export to and import from the two Custom Diffusion codebases (see docs/artifact-format.md, "Interop").

diffusers (examples/custom_diffusion/train_custom_diffusion.py):
  ``pytorch_custom_diffusion_weights.safetensors``  ``<attn2 processor>.to_k_custom_diffusion.weight`` and
      ``.to_v_custom_diffusion.weight``, FULL weights [out, in]; with ``--freeze_model crossattn`` also
      ``.to_q_custom_diffusion.weight`` and ``.to_out_custom_diffusion.0.weight`` / ``.bias``: read,
      and refused when they change to_q or to_out (the engine serves to_k/to_v deltas only)
  ``<token>.safetensors``                            ``{token: [hidden]}``; for a base with two text
      encoders (SDXL) ``{"clip_l": [1, hidden], "clip_g": [1, hidden_2]}``, the SDXL textual-inversion
      layout: diffusers' `load_textual_inversion` takes each key with its ``text_encoder``/``tokenizer``
original repo (adobe-research/custom-diffusion):
  ``delta.bin``           ``{"unet": {diffusers parameter name: full weight},
                           "modifier_token": {token: [hidden]}}``; SDXL (src/diffusers_training_sdxl.py,
                          `CustomDiffusionXLPipeline.save_pretrained`): the UNet's own parameter names too,
                          and ``{token: [[hidden], [hidden_2]]}``, a row per text encoder
  ``delta_epoch=N.ckpt``  ``{"state_dict": {LDM parameter name: full weight, "embed": [n_tokens, hidden]}}``
  Either may be compressed (src/compress.py): a K/V entry is then the delta ``{"u": [out, r], "v": [r, in]}``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from concepts.apply import check_base
from concepts.artifact import Concept, LinearDelta
from concepts.base import CROSSATTN_SUFFIXES, KV_SUFFIXES, BaseModel, kv_layers
from concepts.errors import CorruptArtifact, InvalidArgument

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"
WEIGHTS_NAME_BIN = "pytorch_custom_diffusion_weights.bin"
FORMATS = ("diffusers", "original")
_PT_METADATA = {"format": "pt"}  # what diffusers writes into every safetensors file it saves
# Projection of an attn2 module -> its parameter in diffusers' CustomDiffusionAttnProcessor.
_PROCESSOR_PARAMS = {
    "to_q": "to_q_custom_diffusion",
    "to_k": "to_k_custom_diffusion",
    "to_v": "to_v_custom_diffusion",
    "to_out.0": "to_out_custom_diffusion.0",
}
_LDM_UNET = "model.diffusion_model."
SDXL_TOKEN_KEYS = ("clip_l", "clip_g")  # a token file's rows per text encoder, in the base's order

# A file's parameters, normalized: key in the file -> (diffusers parameter name, full tensor or {"u", "v"}).
Params = dict[str, tuple[str, Any]]


def diffusers_weights(concept: Concept, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors diffusers' `save_attn_procs` writes after Custom Diffusion training, for this concept.

    One entry per parameter of every attn2 processor, FULL weights ``W0 + delta`` in float32 (the
    training script casts the UNet to float32 before saving); low-rank deltas are expanded. The
    ``crossattn_kv`` layout: to_k and to_v.

    Raises:
        InvalidArgument: the concept changes a layer the format cannot hold.
    """
    projections = ["to_k", "to_v"]
    modules = dict(unet.named_modules())
    attns = [p.removesuffix(".processor") for p in unet.attn_processors if p.endswith("attn2.processor")]
    exported = {f"{attn}.{proj}" for attn in attns for proj in projections}
    stray = sorted(set(concept.deltas) - exported)
    if stray:
        raise InvalidArgument("concept", f"deltas for layers the diffusers format cannot hold: {stray[:3]}")
    tensors = {}
    for attn in attns:
        for proj in projections:
            layer = modules[f"{attn}.{proj}"]
            weight = layer.weight.detach().to("cpu", torch.float32)
            if f"{attn}.{proj}" in concept.deltas:
                weight = weight + concept.deltas[f"{attn}.{proj}"].to_dense(torch.float32)
            key = f"{attn}.processor.{_PROCESSOR_PARAMS[proj]}"
            tensors[f"{key}.weight"] = weight.contiguous()
    return tensors


def export_diffusers(concept: Concept, base: BaseModel, out_dir: str | Path) -> list[Path]:
    """Write the concept as diffusers' Custom Diffusion training example does; return the files written.

    Raises:
        BaseMismatch: the concept was made for another base.
        InvalidArgument: a token cannot be a file name, or a delta the format cannot hold.
    """
    check_base(concept, base.fingerprint)
    bad = [t for t in concept.tokens if not t or "/" in t or "\0" in t or t in (".", "..")]
    if bad:
        raise InvalidArgument("tokens", f"{bad} cannot name a <token>.safetensors file")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / WEIGHTS_NAME]
    save_file(diffusers_weights(concept, base.unet), files[0], metadata=_PT_METADATA)
    sdxl = concept.embeddings_2 is not None
    for i, token in enumerate(concept.tokens):
        rows = [encoder_rows[i].detach().to("cpu", torch.float32).clone() for encoder_rows in concept.token_rows]
        files.append(out / f"{token}.safetensors")
        content = {key: row[None] for key, row in zip(SDXL_TOKEN_KEYS, rows)} if sdxl else {token: rows[0]}
        save_file(content, files[-1], metadata=_PT_METADATA)
    return files


def ldm_block_prefixes(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """LDM (CompVis) prefix of each UNet attention block -> its diffusers module path, for this UNet's config.

    LDM numbers its UNet blocks as flat lists: ``input_blocks[0]`` is conv_in, then each down block has
    `layers_per_block` resnet(+attention) blocks followed by a downsampler (none after the last);
    ``output_blocks`` has ``layers_per_block + 1`` blocks per up block. Attention is sub-module 1.
    E.g. SD-1.x: ``input_blocks.4.1`` -> ``down_blocks.1.attentions.0``.
    """
    per_block = unet_config["layers_per_block"]
    if isinstance(per_block, int):
        per_block = [per_block] * len(unet_config["block_out_channels"])
    prefixes = {"middle_block.1": "mid_block.attentions.0"}
    index = 1
    for i, layers in enumerate(per_block):
        for j in range(layers):
            prefixes[f"input_blocks.{index + j}.1"] = f"down_blocks.{i}.attentions.{j}"
        index += layers + 1  # the downsampler
    index = 0
    for i, layers in enumerate(reversed(per_block)):
        for j in range(layers + 1):
            prefixes[f"output_blocks.{index + j}.1"] = f"up_blocks.{i}.attentions.{j}"
        index += layers + 1
    return prefixes


def import_concept(
    path: str | Path,
    base: BaseModel,
    fmt: str | None = None,
    tokens: list[str] | None = None,
    class_words: list[str] | None = None,
) -> Concept:
    """Read a diffusers or original-repo Custom Diffusion checkpoint as deltas against `base`.

    Args:
        path: a diffusers output directory (or its weights file), a ``delta.bin`` or a ``delta_epoch=*.ckpt``.
        base: the base the checkpoint was trained from; deltas are ``W - W0`` against its weights.
        fmt: "diffusers" or "original"; default: "diffusers" for a directory or weights file, else "original".
        tokens: which tokens to read, in order (default: all; a .ckpt's rows are named <new1>, <new2>, ...).
        class_words: the class word of each token, or none.

    Raises:
        InvalidArgument: a bad argument, or a file the artifact format cannot represent.
        CorruptArtifact: a file that does not parse or does not fit the base; the message names it.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidArgument("path", f"{p} does not exist")
    if fmt is None:
        diffusers = p.is_dir() or p.name.startswith("pytorch_custom_diffusion_weights")
        fmt = "diffusers" if diffusers else "original"
    if fmt not in FORMATS:
        raise InvalidArgument("format", f"expected one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "diffusers":
        params, names, rows, files = _read_diffusers(p, tokens)
        kind = "diffusers"
    elif p.is_file():
        params, names, rows, kind = _read_original(p, base.unet.config, tokens)
        files = [p]
    else:
        raise InvalidArgument("path", f"{p} is a directory; the original format is a delta.bin or .ckpt file")
    class_words = list(class_words or [])
    if class_words and len(class_words) != len(names):
        raise InvalidArgument("class_words", f"expected one per token {names}, got {class_words}")
    embeddings = _embeddings(names, rows, base)
    return Concept(
        deltas=_deltas_against(params, base, files[0]),
        tokens=tuple(names),
        embeddings=embeddings[0],
        base_fingerprint=base.fingerprint,
        class_words=tuple(class_words),
        # File digests, not paths: importing the same files anywhere gives the same artifact.
        provenance={
            "kind": "import",
            "format": kind,
            "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
        },
        embeddings_2=embeddings[1] if len(embeddings) > 1 else None,
        family=base.family,
    )


def _embeddings(names: list[str], rows: list[tuple[Path, Any]], base: BaseModel) -> list[torch.Tensor]:
    """Per text encoder of the base, [len(names), hidden] float32 embeddings, checked against its vocabulary
    and widths. Each of `rows` is a token's embedding, or a list of one per text encoder (SDXL)."""
    clashes = [t for t in names if t in base.tokenizer.get_vocab()]
    if clashes:
        raise InvalidArgument("tokens", f"{clashes} already exist in the base's vocabulary")
    widths = [encoder.get_input_embeddings().weight.shape[1] for _, encoder in base.text_pairs]
    per_token = []
    for token, (source, row) in zip(names, rows):
        parts = list(row) if isinstance(row, (list, tuple)) else [row]
        shapes = [tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__ for r in parts]
        if shapes != [(w,) for w in widths]:
            expected = ", ".join(f"[{w}]" for w in widths)
            shown = shapes if isinstance(row, (list, tuple)) else shapes[0]
            raise CorruptArtifact(f"{source}: embedding of {token!r} must be {expected} here, got {shown}")
        per_token.append(parts)
    return [torch.stack([parts[i].to(torch.float32) for parts in per_token]).contiguous() if per_token
            else torch.zeros(0, width) for i, width in enumerate(widths)]


def _read_diffusers(path: Path, tokens: list[str] | None):
    """(params, token names, [(file, embedding or SDXL's [row, row_2])], files read) of a diffusers Custom
    Diffusion output."""
    directory = path if path.is_dir() else path.parent
    candidates = [directory / WEIGHTS_NAME, directory / WEIGHTS_NAME_BIN] if path.is_dir() else [path]
    weights = next((c for c in candidates if c.is_file()), None)
    if weights is None:
        raise InvalidArgument("path", f"{directory} holds no {WEIGHTS_NAME} (nor {WEIGHTS_NAME_BIN})")
    state = _load(weights)
    if not isinstance(state, dict):
        raise CorruptArtifact(f"{weights}: expected a dict of processor weights, got {type(state).__name__}")
    params: Params = {}
    for key, value in state.items():
        if isinstance(value, dict) and not value:
            continue  # torch.save'd files mark processors without weights (attn1) with {}
        attn, sep, param = key.partition(".processor.")
        proj = next((p for p, name in _PROCESSOR_PARAMS.items() if param.startswith(f"{name}.")), None)
        if not sep or proj is None or param.rpartition(".")[2] not in ("weight", "bias"):
            raise CorruptArtifact(f"{weights}: {key!r} is not a Custom Diffusion processor weight")
        params[key] = (f"{attn}.{proj}.{param.rpartition('.')[2]}", value)
    if tokens is None:
        token_files = sorted(
            p
            for p in directory.iterdir()
            if p.is_file()
            and p.suffix in (".safetensors", ".bin")
            and not p.name.startswith("pytorch_custom_diffusion_weights")
        )
    else:
        token_files = [_token_file(directory, t) for t in tokens]
    names, rows = [], []
    for file in token_files:
        content = _load(file)
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        if keys not in ([file.stem], sorted(SDXL_TOKEN_KEYS)):
            raise CorruptArtifact(f"{file}: a token file holds exactly {{{file.stem!r}: embedding}} (or, for SDXL, "
                                  f"{{'clip_l': [1, hidden], 'clip_g': [1, hidden_2]}}), got {keys}")
        names.append(file.stem)
        rows.append((file, content[file.stem] if keys == [file.stem] else
                     [_one_row(content[key]) for key in SDXL_TOKEN_KEYS]))
    return params, names, rows, [weights, *token_files]


def _one_row(rows: Any) -> Any:
    """An SDXL token file's [1, hidden] entry as [hidden] (anything else is left for `_embeddings` to refuse)."""
    return rows[0] if isinstance(rows, torch.Tensor) and rows.ndim == 2 and rows.shape[0] == 1 else rows


def _token_file(directory: Path, token: str) -> Path:
    for suffix in (".safetensors", ".bin"):
        if (directory / f"{token}{suffix}").is_file():
            return directory / f"{token}{suffix}"
    raise InvalidArgument("tokens", f"{directory} has no {token}.safetensors (nor {token}.bin)")


def _read_original(path: Path, unet_config: Mapping[str, Any], tokens: list[str] | None):
    """(params, token names, [(file, embedding)], kind) of the original repo's delta.bin or .ckpt."""
    data = _load(path)
    # src/diffusers_model_pipeline.py: CustomDiffusionPipeline.save_pretrained
    if isinstance(data, dict) and "unet" in data:
        if "text_encoder" in data:
            raise InvalidArgument("path", f"{path}: holds a fine-tuned text encoder; artifacts carry none")
        unknown = sorted(set(data) - {"unet", "modifier_token"})
        embeds = data.get("modifier_token", {})
        if unknown or not isinstance(data["unet"], dict) or not isinstance(embeds, dict):
            raise CorruptArtifact(
                f"{path}: expected {{'unet': dict, 'modifier_token': dict}}, got keys {sorted(data)}"
            )
        names = list(embeds) if tokens is None else tokens
        missing = [t for t in names if t not in embeds]
        if missing:
            raise InvalidArgument("tokens", f"{path}: has no modifier token {missing}; it has {list(embeds)}")
        params = {k: (k, v) for k, v in data["unet"].items()}
        return params, names, [(path, embeds[t]) for t in names], "original-diffusers"
    # CompVis-based training, reduced to the trained layers by src/get_deltas.py
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        state = dict(data["state_dict"])
        embed = state.pop("embed", torch.zeros(0, 0))
        if not isinstance(embed, torch.Tensor) or embed.ndim != 2:
            raise CorruptArtifact(
                f"{path}: 'embed' must be [n_tokens, hidden], got {getattr(embed, 'shape', embed)}"
            )
        names = tokens if tokens is not None else [f"<new{i + 1}>" for i in range(embed.shape[0])]
        if len(names) != embed.shape[0]:
            raise InvalidArgument(
                "tokens", f"{path}: 'embed' has {embed.shape[0]} rows, got {len(names)} tokens"
            )
        prefixes = ldm_block_prefixes(unet_config)
        params = {key: (_ldm_to_diffusers(key, prefixes, path), v) for key, v in state.items()}
        return params, names, [(path, row) for row in embed], "original-ldm"
    keys = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise CorruptArtifact(
        f"{path}: not a Custom Diffusion delta.bin ('unet') or .ckpt ('state_dict'), got {keys}"
    )


def _ldm_to_diffusers(key: str, prefixes: dict[str, str], path: Path) -> str:
    parts = key.removeprefix(_LDM_UNET).split(".")
    depth = 2 if parts[0] == "middle_block" else 3
    module = prefixes.get(".".join(parts[:depth]))
    if not key.startswith(_LDM_UNET) or module is None:
        raise CorruptArtifact(f"{path}: {key!r} is not an attention parameter of this base's LDM UNet")
    return ".".join([module, *parts[depth:]])


def _deltas_against(params: Params, base: BaseModel, source: Path) -> dict[str, LinearDelta]:
    """Dense float32 deltas ``W - W0`` of full weights (zero ones dropped), factors of compressed entries."""
    layers = kv_layers(base.unet, CROSSATTN_SUFFIXES)
    deltas = {}
    for key, (param, value) in params.items():
        module, _, kind = param.rpartition(".")
        layer = layers.get(module)
        if layer is None or kind not in ("weight", "bias") or getattr(layer, kind) is None:
            raise CorruptArtifact(
                f"{source}: {key!r} names {param}, not a cross-attention projection of this base"
            )
        w0 = getattr(layer, kind).detach().to("cpu", torch.float32)
        if isinstance(value, dict) and kind == "weight":
            deltas[module] = _factors(value, tuple(w0.shape), key, source)
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(w0.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CorruptArtifact(
                f"{source}: {key!r} must be {tuple(w0.shape)} like the base's {param}, got {shape}"
            )
        delta = value.to(torch.float32) - w0
        if kind == "bias" and delta.any():
            message = f"{source}: {key!r} changes a bias, but artifacts hold weight deltas only"
            raise InvalidArgument("path", message)
        if kind == "weight" and delta.any():
            deltas[module] = LinearDelta(dense=delta.contiguous())
    unservable = sorted(m for m in deltas if not m.endswith(KV_SUFFIXES))
    if unservable:
        raise InvalidArgument("path", f"{source}: changes {unservable[0]} ({len(unservable)} to_q/to_out layers: "
                              "trained with --freeze_model crossattn); customdiff serves to_k/to_v concepts only "
                              "(the engine applies them per request): train with crossattn_kv")
    return dict(sorted(deltas.items()))


def _factors(value: dict, shape: tuple[int, int], key: str, source: Path) -> LinearDelta:
    """A compressed entry ``{"u": [out, r], "v": [r, in]}`` (src/compress.py) as low-rank delta factors."""
    up, down = value.get("u"), value.get("v")
    if (
        set(value) != {"u", "v"}
        or not isinstance(up, torch.Tensor)
        or not isinstance(down, torch.Tensor)
        or up.ndim != 2
        or down.ndim != 2
        or (up.shape[0], down.shape[1]) != shape
        or up.shape[1] != down.shape[0]
    ):
        raise CorruptArtifact(
            f"{source}: compressed {key!r} must be {{'u': [out, r], 'v': [r, in]}} with "
            f"[out, in] = {list(shape)}"
        )
    return LinearDelta(up=up.to(torch.float32).contiguous(), down=down.to(torch.float32).contiguous())


def _load(path: Path) -> Any:
    """A safetensors file's tensors, or a torch checkpoint loaded without running pickled code."""
    data = path.read_bytes()
    if data[8:9] == b"{":  # a safetensors header; diffusers' older scripts wrote these under .bin names too
        try:
            return st_load(data)
        except SafetensorError as e:
            raise CorruptArtifact(f"{path}: unreadable safetensors file: {e}") from e
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise CorruptArtifact(f"{path}: neither safetensors nor a readable torch checkpoint: {e}") from e
