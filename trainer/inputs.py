"""Everything about a job that can be checked before compute: base, tokenizer, tokens, images, store.

`trainer.spec.check_inputs` calls `check_files`; it lives here so that importing the spec (as the
services do) pulls in neither PIL nor transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from PIL import Image

from concepts.base import check_base_dir, model_index
from concepts.errors import InvalidArgument
from trainer.data import load_image
from trainer.spec import JobSpec
from trainer.tokens import in_vocabulary

# The pipeline a base directory must name, by its text encoders: (class name, what it is).
ONE_TEXT_ENCODER = ("StableDiffusionPipeline", "Stable Diffusion 1.x/2.x")
TWO_TEXT_ENCODERS = ("StableDiffusionXLPipeline", "Stable Diffusion XL")


def load_tokenizer(base_dir: Path, name: str = "tokenizer"):
    """The base's CLIP tokenizer `name`, or `InvalidArgument("base_model", ...)` saying why it does not load."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(base_dir / name)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidArgument("base_model", f"{base_dir}/{name} does not load as a CLIP tokenizer: {e}") from None


def tokenizer_names(base: Path) -> tuple[str, ...]:
    """The base's tokenizer folders: SDXL's two, else one."""
    return ("tokenizer", "tokenizer_2") if "text_encoder_2" in model_index(base, "base_model") else ("tokenizer",)


def check_base(path: str) -> Path:
    """A diffusers Stable Diffusion 1.x/2.x or XL directory that names the pipeline of its text encoders
    (`ONE_TEXT_ENCODER`, `TWO_TEXT_ENCODERS`), else `InvalidArgument` naming what is wrong."""
    base = check_base_dir(path, "base_model")
    index = model_index(base, "base_model")
    encoders = 2 if "text_encoder_2" in index else 1
    expected, kind = TWO_TEXT_ENCODERS if encoders == 2 else ONE_TEXT_ENCODER
    pipeline = index.get("_class_name")
    if pipeline != expected:
        raise InvalidArgument("base_model", f"{base} holds a {pipeline!r}; a base with {encoders} text "
                              f"encoder{'s' if encoders == 2 else ''} must be a {expected!r} ({kind})")
    return base


def native_resolution(base_dir: Path) -> int:
    """The base's own image size: UNet ``sample_size`` x the VAE's scale factor, as diffusers pipelines
    default height and width (2 ** (len(vae ``block_out_channels``) - 1); 512 for SD 1.x).

    Read from the components' ``config.json``, so it costs no weights.
    """
    try:
        unet = json.loads((base_dir / "unet" / "config.json").read_text())
        vae = json.loads((base_dir / "vae" / "config.json").read_text())
        sample_size, blocks = unet["sample_size"], vae["block_out_channels"]
        if isinstance(sample_size, (list, tuple)):  # diffusers allows (height, width); training is square
            sample_size = min(sample_size)
        return int(sample_size) * 2 ** (len(blocks) - 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgument("base_model", f"{base_dir}: cannot read the UNet's sample_size and the VAE's "
                              f"block_out_channels from their config.json ({e})") from None


def resolve_resolution(spec: JobSpec, base_dir: Path) -> JobSpec:
    """`spec` with an unset ``hyperparameters.resolution`` set to the base's `native_resolution`."""
    hp = spec.hyperparameters
    if hp.resolution is not None:
        return spec
    size = native_resolution(base_dir)
    try:
        hp = dataclasses.replace(hp, resolution=size)
    except InvalidArgument as e:
        raise InvalidArgument("hyperparameters.resolution", f"is unset and the base's own size {size} px does "
                              f"not fit ({e.description}); set it") from None
    return dataclasses.replace(spec, hyperparameters=hp)


def check_image(field: str, path: str, min_side: int) -> None:
    """Raise `InvalidArgument(field, ...)` unless `path` decodes to an image whose shorter side >= `min_side`."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(field, f"{path} does not exist or is not a file")
    try:
        image = load_image(p)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidArgument(field, f"{path} is not a readable image ({e})") from None
    w, h = image.size
    if min(w, h) < min_side:
        raise InvalidArgument(field, f"{path} is {w}x{h} pixels; its shorter side must be at least {min_side} "
                              f"(half the training resolution)")


def check_tokens(spec: JobSpec, tokenizer) -> None:
    """New modifier tokens, single-token initializers, prompts that fit, class captions without tokens."""
    for i, concept in enumerate(spec.concepts):
        if in_vocabulary(tokenizer, concept.modifier_token):
            raise InvalidArgument(f"concepts[{i}].modifier_token", f"{concept.modifier_token!r} already exists in "
                                  "the tokenizer's vocabulary; choose a new word such as <new1>")
        ids = tokenizer.encode(concept.initializer_token, add_special_tokens=False)
        if len(ids) != 1:
            raise InvalidArgument(f"concepts[{i}].initializer_token", f"{concept.initializer_token!r} is "
                                  f"{len(ids)} tokens for this tokenizer; it must be exactly one")
    tokens = [c.modifier_token for c in spec.concepts]
    tokenizer.add_tokens(tokens)
    limit = tokenizer.model_max_length
    for i, concept in enumerate(spec.concepts):
        # The longest caption the augmentation makes: prefix + instance prompt.
        caption = "zoomed in " + concept.instance_caption()
        if len(tokenizer(caption).input_ids) > limit:
            raise InvalidArgument(f"concepts[{i}].instance_prompt", f"{caption!r} is longer than the "
                                  f"tokenizer's {limit} tokens")
        for j, image in enumerate(concept.class_images):
            used = [t for t in tokens if t in image.caption.split()]
            if used:
                raise InvalidArgument(f"concepts[{i}].class_images[{j}].caption",
                                      f"must not contain modifier tokens, got {image.caption!r}")


def check_files(spec: JobSpec) -> JobSpec:
    """See `trainer.spec.check_inputs`."""
    from concepts.store import ArtifactStore

    base = check_base(spec.base_model)
    spec = resolve_resolution(spec, base)
    for name in tokenizer_names(base):
        check_tokens(spec, load_tokenizer(base, name))  # the tokens go into every tokenizer
    min_side = spec.hyperparameters.resolution // 2
    for i, concept in enumerate(spec.concepts):
        for j, path in enumerate(concept.images):
            check_image(f"concepts[{i}].images[{j}]", path, min_side)
        for j, image in enumerate(concept.class_images):
            check_image(f"concepts[{i}].class_images[{j}].path", image.path, min_side)
    try:
        ArtifactStore(spec.store_url)
    except Exception as e:  # noqa: BLE001 - fsspec raises whatever its backend raises
        raise InvalidArgument("store_url", f"cannot open artifact store {spec.store_url!r}: {e}") from None
    try:
        spec.work_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument("work_dir", f"cannot create {spec.work_dir}: {e}") from None
    return spec
