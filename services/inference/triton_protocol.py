"""What the Triton model "stable_diffusion" and its clients agree on: model parameters and error texts.

Kept out of `1/model.py` (which only Triton's Python backend can import) so both sides share it and
tests reach it. Inputs and outputs are documented in deploy/triton/README.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from concepts import errors
from concepts.errors import CustomDiffError, InvalidArgument

MODEL_NAME = "stable_diffusion"
DTYPES = ("float32", "float16", "bfloat16")
# config.pbtxt parameter -> the environment variable that overrides it (the Helm chart sets these).
ENV_OVERRIDES = {"base_model": "CUSTOMDIFF_BASE_MODEL", "store_url": "CUSTOMDIFF_STORE_URL",
                 "cache_bytes": "CUSTOMDIFF_CACHE_BYTES", "unet_backend": "CUSTOMDIFF_UNET_BACKEND",
                 "unet_onnx": "CUSTOMDIFF_UNET_ONNX", "compose": "CUSTOMDIFF_COMPOSE"}
_ERROR = re.compile(r"\[([A-Z_]+)\] (.*)", re.DOTALL)


@dataclass(frozen=True)
class ModelSettings:
    """The model's `parameters` in config.pbtxt, typed.

    Args:
        base_model: diffusers Stable Diffusion directory.
        store_url: artifact store (directory or fsspec URL).
        cache_bytes: concept-cache budget in the instance's device memory.
        host_cache_bytes: budget of the host-memory tier behind it (GPU instances only).
        max_batch_images: most images in one UNet batch.
        dtype: compute dtype: float32, float16 or bfloat16.
        unet_backend: "torch", or "onnxruntime" for the UNet `customdiff export-onnx` wrote to `unet_onnx`
            (checked by `engine.onnx_unet.onnx_unet` when the engine is built).
        unet_onnx: that export's directory, or its ``unet/1/model.onnx``.
        compose: "sum" or "merge": how a request's several concepts act (`engine.engine.Engine`'s
            `compose`, checked when the engine is built; the ONNX repository serves "sum" only).
        compose_captions_file: with "merge", the merges' regularization captions, one per line ("": the
            merger's shipped set).
        compose_context_captions: with "merge", per token, the regularization captions naming its class
            word that also constrain it.
        compose_cache_bytes: with "merge", budget of the kept merges in the instance's device memory.
    """

    base_model: str
    store_url: str
    cache_bytes: int = 1 << 30
    host_cache_bytes: int = 4 << 30
    max_batch_images: int = 16
    dtype: str = "float32"
    unet_backend: str = "torch"
    unet_onnx: str = ""
    compose: str = "sum"
    compose_captions_file: str = ""
    compose_context_captions: int = 0
    compose_cache_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for name in ("base_model", "store_url"):
            if not getattr(self, name):
                raise InvalidArgument(name, f"is empty; set the config.pbtxt parameter or ${ENV_OVERRIDES[name]}")
        for name in ("cache_bytes", "host_cache_bytes", "max_batch_images", "compose_context_captions",
                     "compose_cache_bytes"):
            if getattr(self, name) < (1 if name == "max_batch_images" else 0):
                raise InvalidArgument(name, f"must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_config(cls, parameters: Mapping[str, Mapping[str, str]], environ: Mapping[str, str]) -> ModelSettings:
        """From config.pbtxt's ``parameters`` (``{key: {"string_value": ...}}``), env overrides applied.

        Raises:
            InvalidArgument: an unknown key, a value of the wrong type, or one `__post_init__` rejects.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(parameters) - set(fields))
        if unknown:
            raise InvalidArgument(unknown[0], f"unknown model parameter(s) {unknown}; known: {sorted(fields)}")
        raw = {key: value["string_value"] for key, value in parameters.items()}
        raw.update({key: environ[env] for key, env in ENV_OVERRIDES.items() if environ.get(env)})
        values = {}
        for key, text in raw.items():
            if fields[key].type == "int":
                try:
                    values[key] = int(text)
                except ValueError:
                    raise InvalidArgument(key, f"expected an integer, got {text!r}") from None
            else:
                values[key] = text
        return cls(**values)


def error_text(error: CustomDiffError) -> str:
    """How a model reports a domain error: ``[REASON] message`` (InvalidArgument: ``field: ...``)."""
    return f"[{error.reason}] {error}"


def error_from_text(text: str) -> CustomDiffError | None:
    """The domain error `error_text` wrote into a Triton error message, or None if there is none."""
    match = _ERROR.search(text)
    if match is None:
        return None
    reason, message = match.groups()
    if reason == "INVALID_ARGUMENT":
        field, _, description = message.partition(": ")
        return InvalidArgument(field, description)
    if reason == "BASE_MISMATCH":
        return errors.FailedPrecondition(message)
    cls = {c.reason: c for c in (errors.NotFound, errors.FailedPrecondition, errors.CorruptArtifact,
                                 errors.Unavailable, errors.ResourceExhausted, errors.DeadlineExceeded)}.get(reason)
    return cls(message) if cls else CustomDiffError(message)
