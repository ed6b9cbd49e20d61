"""One text-to-image request as the engine and Triton see it: validated on construction, naming the field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from concepts.artifact import check_digest
from concepts.errors import InvalidArgument, quote
from engine.schedulers import SCHEDULERS

MAX_SIDE = 2048
MAX_IMAGES = 8
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1
MAX_CONCEPT_WEIGHT = 2.0


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate; every image of the request uses all of `concept_digests`.

    Args:
        prompt: text, may use the concepts' modifier tokens, e.g. ``"photo of a <new1> dog"``.
        negative_prompt: the classifier-free guidance's unconditional text ("" as in diffusers).
        concept_digests: sha256 digests of concept artifacts (``sha256:`` prefix accepted); empty
            uses the plain base model.
        concept_weights: per concept, in `concept_digests` order, the factor on its K/V deltas,
            0..2 (the modifier-token embeddings are never scaled); empty means 1 for every concept,
            and a tuple of only 1s is normalized to empty. `weights` has the full tuple.
        num_images: images to generate, 1..8; image i uses seed ``seed + i``.
        num_inference_steps: denoising steps, 1..150.
        guidance_scale: 0..30; 1 or less disables classifier-free guidance, as in diffusers.
        seed: seed of image 0's `torch.Generator().manual_seed`, 0..2**63-1.
        height: pixels, a multiple of 8 up to 2048; 0 uses the base model's sample size.
        width: like height.
        scheduler: "" (the base's own), "ddim", "dpm_solver_multistep" (DPM-Solver++) or "euler".

    Raises:
        InvalidArgument: naming the first invalid field and the value received.
    """

    prompt: str
    negative_prompt: str = ""
    concept_digests: tuple[str, ...] = ()
    concept_weights: tuple[float, ...] = ()
    num_images: int = 1
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    height: int = 0
    width: int = 0
    scheduler: str = ""

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            _check_type(name, getattr(self, name), str)
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise InvalidArgument(name, f"at most {MAX_PROMPT_CHARS} characters (the text encoder reads "
                                            f"77 tokens), got {len(getattr(self, name))}")
        if isinstance(self.concept_digests, (str, bytes)) or not isinstance(self.concept_digests, (tuple, list)):
            raise InvalidArgument("concept_digests", f"expected a sequence of digests, got {quote(self.concept_digests)}")
        digests = tuple(check_digest(str(d), f"concept_digests[{i}]") for i, d in enumerate(self.concept_digests))
        if len(set(digests)) != len(digests):
            raise InvalidArgument("concept_digests", f"a concept is named twice: {list(self.concept_digests)}")
        object.__setattr__(self, "concept_digests", digests)
        object.__setattr__(self, "concept_weights", _check_weights(self.concept_weights, len(digests)))
        _check_int("num_images", self.num_images, 1, MAX_IMAGES)
        _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        _check_type("guidance_scale", self.guidance_scale, (int, float))
        if not (math.isfinite(self.guidance_scale) and 0.0 <= self.guidance_scale <= MAX_GUIDANCE):
            raise InvalidArgument("guidance_scale", f"must be within [0, {MAX_GUIDANCE:g}], got {quote(self.guidance_scale)}")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        _check_int("seed", self.seed, 0, MAX_SEED - (self.num_images - 1))
        for name in ("height", "width"):
            value = getattr(self, name)
            _check_int(name, value, 0, MAX_SIDE)
            if value % 8:
                raise InvalidArgument(name, f"must be a multiple of 8 (or 0 for the base's size), got {value}")
        if self.scheduler not in SCHEDULERS:
            raise InvalidArgument("scheduler", f"must be one of {list(SCHEDULERS)}, got {quote(self.scheduler)}")

    @property
    def weights(self) -> tuple[float, ...]:
        """Each concept's weight, aligned with `concept_digests` (1.0 where `concept_weights` is empty)."""
        return self.concept_weights or (1.0,) * len(self.concept_digests)

    @property
    def do_guidance(self) -> bool:
        """Classifier-free guidance runs, as in diffusers, only for a guidance scale above 1."""
        return self.guidance_scale > 1.0

    def to_parameters(self) -> dict[str, Any]:
        """Every field except the prompts, as Triton request parameters (strings, ints, floats).

        `concept_weights` is left out when empty (every weight 1), so such a request reads the same
        to a model that predates the field; otherwise it is ``repr`` of each float, comma-separated
        (exact round trip).
        """
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("prompt", "negative_prompt")}
        params["concept_digests"] = ",".join(self.concept_digests)
        if self.concept_weights:
            params["concept_weights"] = ",".join(repr(w) for w in self.concept_weights)
        else:
            del params["concept_weights"]
        return params

    @classmethod
    def from_parameters(cls, prompt: str, negative_prompt: str, params: dict[str, Any]) -> GenerationRequest:
        """The inverse of `to_parameters`; rejects unknown keys.

        Raises:
            InvalidArgument: an unknown key, or a field `__post_init__` rejects.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"prompt", "negative_prompt"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidArgument(unknown[0], f"unknown request parameter(s) {unknown}; known: {sorted(known)}")
        values = dict(params)
        if "concept_digests" in values:
            _check_type("concept_digests", values["concept_digests"], str)
            values["concept_digests"] = tuple(d for d in values["concept_digests"].split(",") if d)
        if "concept_weights" in values:
            values["concept_weights"] = _parse_weights(values["concept_weights"])
        return cls(prompt=prompt, negative_prompt=negative_prompt, **values)


def _check_weights(weights: object, count: int) -> tuple[float, ...]:
    """`weights` as floats, one per concept, each finite within [0, MAX_CONCEPT_WEIGHT]; () if all are 1."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (tuple, list)):
        raise InvalidArgument("concept_weights", f"expected a sequence of numbers, got {quote(weights)}")
    if not weights:
        return ()
    if len(weights) != count:
        raise InvalidArgument("concept_weights", f"one weight per concept digest ({count}), "
                                                 f"got {len(weights)}: {quote(list(weights))}")
    for i, weight in enumerate(weights):
        _check_type(f"concept_weights[{i}]", weight, (int, float))
        if not (math.isfinite(weight) and 0.0 <= weight <= MAX_CONCEPT_WEIGHT):
            raise InvalidArgument(f"concept_weights[{i}]", f"must be within [0, {MAX_CONCEPT_WEIGHT:g}], "
                                                           f"got {quote(weight)}")
    floats = tuple(float(w) for w in weights)
    return () if all(w == 1.0 for w in floats) else floats


def _parse_weights(text: object) -> tuple[float, ...]:
    """The Triton parameter ``"0.5,1.0"`` -> (0.5, 1.0); range checks are `_check_weights`'s."""
    _check_type("concept_weights", text, str)
    try:
        return tuple(float(w) for w in text.split(",") if w)
    except ValueError:
        raise InvalidArgument("concept_weights",
                              f"expected comma-separated numbers, got {quote(text)}") from None


def _check_type(name: str, value: object, types: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise InvalidArgument(name, f"wrong type {type(value).__name__}: {quote(value)}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    _check_type(name, value, int)
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be within [{low}, {high}], got {value}")
