"""The training job spec (docs/job-spec.md): frozen dataclasses validated on construction.

`JobSpec.from_dict` rejects unknown keys and fills position-dependent defaults (modifier token,
initializer word, step count), so `to_dict()` shows what runs. `check_inputs` then checks
everything on disk that could fail later (base, tokens, images, store) before any compute, and
returns the spec with what depends on the base filled in (an unset resolution: the base's own size).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concepts.config import from_dict
from concepts.errors import InvalidArgument

# The reference's initializer words, then DreamBooth's "sks"; all are single CLIP tokens.
DEFAULT_INITIALIZERS = ("ktn", "pll", "ucd", "sks")
DEFAULT_INSTANCE_PROMPT = "photo of a {token} {class_prompt}"
STEPS_PER_CONCEPT = 250  # the reference: 250 steps for one concept, 500 for two
TRAIN_MODES = ("crossattn_kv",)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
MAX_STEPS = 20_000
MAX_LEARNING_RATE = 1e-3


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InvalidArgument(name, f"must be {bounds}, got {value}")


def _check_float(obj: Any, name: str, lo: float, hi: float | None = None, lo_open: bool = False,
                 where: str = "") -> None:
    """Check a number field of a frozen dataclass and store it as float."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(where + name, f"must be a number, got {value!r}")
    too_low = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or too_low or (hi is not None and value > hi):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidArgument(where + name, f"must be {low}" + (f" and <= {hi}" if hi is not None else "")
                              + f", got {value}")
    object.__setattr__(obj, name, float(value))


def _check_str(name: str, value: Any, required: bool = True) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a string, got {value!r}")
    if required and not value.strip():
        raise InvalidArgument(name, "must not be empty")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"must be true or false, got {value!r}")


@dataclass(frozen=True)
class ClassImage:
    """A regularization image and its caption (empty: the concept's class prompt)."""

    path: str
    caption: str = ""

    def __post_init__(self) -> None:
        _check_str("path", self.path)
        _check_str("caption", self.caption, required=False)


@dataclass(frozen=True)
class ConceptSpec:
    """One concept: a few images of one instance of a class, learned as one modifier token."""

    name: str
    class_prompt: str
    images: tuple[str, ...]
    instance_prompt: str = DEFAULT_INSTANCE_PROMPT
    modifier_token: str = ""
    initializer_token: str = ""
    class_images: tuple[ClassImage, ...] = ()
    num_class_images: int = 200

    def __post_init__(self) -> None:
        _check_str("name", self.name)
        _check_str("class_prompt", self.class_prompt)
        if not isinstance(self.images, (list, tuple)) or not self.images:
            raise InvalidArgument("images", f"needs at least one image file, got {self.images!r}")
        object.__setattr__(self, "images", tuple(self.images))
        for i, path in enumerate(self.images):
            _check_str(f"images[{i}]", path)
        _check_str("instance_prompt", self.instance_prompt)
        for name in ("modifier_token", "initializer_token"):
            value = getattr(self, name)
            _check_str(name, value, required=False)
            if value != value.strip() or " " in value:
                raise InvalidArgument(name, f"must be one word without spaces, got {value!r}")
        if not isinstance(self.class_images, (list, tuple)):
            raise InvalidArgument("class_images", f"must be a list, got {self.class_images!r}")
        images = []
        for i, item in enumerate(self.class_images):
            if isinstance(item, dict):
                item = from_dict(ClassImage, item, f"class_images[{i}]")
            if not isinstance(item, ClassImage):
                raise InvalidArgument(f"class_images[{i}]", f"must be an object {{path, caption}}, got {item!r}")
            images.append(item)
        object.__setattr__(self, "class_images", tuple(images))
        _check_int("num_class_images", self.num_class_images, 1, 10_000)
        if self.modifier_token:
            self.instance_caption()

    def instance_caption(self) -> str:
        """The instance prompt with ``{token}`` and ``{class_prompt}`` filled in."""
        try:
            caption = self.instance_prompt.format(token=self.modifier_token, class_prompt=self.class_prompt)
        except (KeyError, IndexError, ValueError) as e:
            raise InvalidArgument("instance_prompt", f"only {{token}} and {{class_prompt}} may be used in "
                                  f"braces, got {self.instance_prompt!r} ({e})") from None
        if self.modifier_token not in caption.split():
            raise InvalidArgument("instance_prompt", f"must contain the modifier token {self.modifier_token!r} "
                                  f"(or {{token}}) as a word, got {self.instance_prompt!r}")
        return caption

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "concept") -> ConceptSpec:
        return from_dict(cls, data, where)


@dataclass(frozen=True)
class Hyperparameters:
    """Training settings; the defaults are the reference's (docs/job-spec.md).

    The batch: `effective_batch_size` target images per optimizer step over every process (plus as many
    class images with prior preservation: the paper's 4 + 4). An unset `train_batch_size` (per process and
    micro-batch) or `gradient_accumulation_steps` is derived from it for the job's process count
    (`trainer.loop.batch_plan`).

    `resolution` None means the base's own size (`trainer.inputs.native_resolution`), filled in by
    `check_inputs` once the base is known, as diffusers pipelines default height and width.
    """

    max_train_steps: int | None = None
    learning_rate: float = 1e-5
    scale_lr: bool = True
    effective_batch_size: int = 4
    train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    resolution: int | None = None
    train_mode: str = "crossattn_kv"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    checkpointing_steps: int = 100
    augment: bool = True
    hflip: bool = True
    views_per_image: int = 32
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    class_image_steps: int = 50

    def __post_init__(self) -> None:
        if self.max_train_steps is not None:
            _check_int("max_train_steps", self.max_train_steps, 1, MAX_STEPS)
        _check_float(self, "learning_rate", 0.0, MAX_LEARNING_RATE, lo_open=True)
        _check_float(self, "prior_loss_weight", 0.0)
        _check_float(self, "weight_decay", 0.0, 1.0)
        _check_float(self, "max_grad_norm", 0.0, lo_open=True)
        for name in ("scale_lr", "with_prior_preservation", "gradient_checkpointing", "augment", "hflip"):
            _check_bool(name, getattr(self, name))
        _check_int("effective_batch_size", self.effective_batch_size, 1, 1024)
        for name in ("train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1, 256)
        if self.resolution is not None:
            _check_int("resolution", self.resolution, 64, 2048)
            if self.resolution % 64:
                raise InvalidArgument("resolution", f"must be a multiple of 64, got {self.resolution}")
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("checkpointing_steps", self.checkpointing_steps, 1)
        _check_int("views_per_image", self.views_per_image, 1, 1024)
        _check_int("class_image_steps", self.class_image_steps, 1, 1000)
        if self.train_mode == "crossattn":
            raise InvalidArgument("train_mode", "'crossattn' (to_q and to_out too) is not offered: those deltas act on "
                                  "the image features at every step, which the engine cannot apply per request; "
                                  "use 'crossattn_kv'")
        if self.train_mode not in TRAIN_MODES:
            raise InvalidArgument("train_mode", f"must be one of {list(TRAIN_MODES)}, got {self.train_mode!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise InvalidArgument("mixed_precision",
                                  f"must be one of {list(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")


@dataclass(frozen=True)
class JobSpec:
    """One training job: which base, which concepts, which settings, where results go."""

    base_model: str
    store_url: str
    work_dir: str
    concepts: tuple[ConceptSpec, ...]
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    concept_name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    class_image_cache_dir: str = ""
    device: str = "auto"
    stop_after_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("base_model", "store_url", "work_dir"):
            _check_str(name, getattr(self, name))
        if not isinstance(self.concepts, (list, tuple)) or not self.concepts:
            raise InvalidArgument("concepts", f"needs at least one concept, got {self.concepts!r}")
        concepts = [_resolve_concept(i, c) for i, c in enumerate(self.concepts)]
        object.__setattr__(self, "concepts", tuple(concepts))
        # CLIP lower-cases text, so "<New1>" and "<new1>" are one token.
        _check_unique("concepts", "modifier_token", [c.modifier_token.lower() for c in concepts])
        _check_unique("concepts", "name", [c.name for c in concepts])
        hp = self.hyperparameters
        if isinstance(hp, dict):
            hp = from_dict(Hyperparameters, hp, "hyperparameters")
        if not isinstance(hp, Hyperparameters):
            raise InvalidArgument("hyperparameters", f"must be an object, got {hp!r}")
        if hp.max_train_steps is None:
            hp = dataclasses.replace(hp, max_train_steps=STEPS_PER_CONCEPT * len(concepts))
        object.__setattr__(self, "hyperparameters", hp)
        _check_str("concept_name", self.concept_name, required=False)
        if not self.concept_name:
            object.__setattr__(self, "concept_name", "+".join(c.name for c in concepts))
        if not isinstance(self.provenance, dict):
            raise InvalidArgument("provenance", f"must be a JSON object, got {self.provenance!r}")
        try:
            json.dumps(self.provenance)
        except (TypeError, ValueError) as e:
            raise InvalidArgument("provenance", f"must be JSON-serializable: {e}") from None
        _check_str("class_image_cache_dir", self.class_image_cache_dir, required=False)
        if not self.class_image_cache_dir:
            object.__setattr__(self, "class_image_cache_dir", str(Path(self.work_dir).parent / "class-images"))
        if self.device not in DEVICES:
            raise InvalidArgument("device", f"must be one of {list(DEVICES)}, got {self.device!r}")
        if self.stop_after_steps is not None:
            _check_int("stop_after_steps", self.stop_after_steps, 1, hp.max_train_steps)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Build from parsed JSON; unknown keys anywhere are rejected with their path."""
        if isinstance(data, dict) and isinstance(data.get("concepts"), list):
            data = {**data, "concepts": [ConceptSpec.from_dict(c, f"concepts[{i}]") if isinstance(c, dict) else c
                                         for i, c in enumerate(data["concepts"])]}
        return from_dict(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, defaults filled in; `from_dict(to_dict())` gives an equal spec."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir)


def _resolve_concept(index: int, concept: Any) -> ConceptSpec:
    """Fill the position-dependent defaults: ``<new{i+1}>``, the i-th initializer, class captions."""
    where = f"concepts[{index}]"
    if not isinstance(concept, ConceptSpec):
        raise InvalidArgument(where, f"must be a concept object, got {concept!r}")
    token = concept.modifier_token or f"<new{index + 1}>"
    initializer = concept.initializer_token
    if not initializer:
        if index >= len(DEFAULT_INITIALIZERS):
            raise InvalidArgument(f"{where}.initializer_token", f"has no default beyond the "
                                  f"{len(DEFAULT_INITIALIZERS)}th concept; set a word that is one token")
        initializer = DEFAULT_INITIALIZERS[index]
    class_images = tuple(dataclasses.replace(c, caption=c.caption or concept.class_prompt)
                         for c in concept.class_images)
    try:
        return dataclasses.replace(concept, modifier_token=token, initializer_token=initializer,
                                   class_images=class_images)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}.{e.field}", e.description) from None


def _check_unique(where: str, name: str, values: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in seen:
            raise InvalidArgument(f"{where}[{i}].{name}", f"{value!r} is already used by {where}[{seen[value]}]")
        seen[value] = i


def check_inputs(spec: JobSpec) -> JobSpec:
    """Check everything that could fail after compute started; raise `InvalidArgument` naming the field.

    Checks the base directory and tokenizer, that each modifier token is new and each initializer
    word is a single token, that every prompt fits the tokenizer, that every image decodes and is
    at least half the training resolution on its shorter side, and that the store opens.

    Returns:
        `spec` with an unset resolution replaced by the base's own size (what runs).
    """
    from trainer.inputs import check_files

    return check_files(spec)
