"""GenerationRequest validation, its Triton parameter encoding, and the Triton model's settings and error texts."""

from __future__ import annotations

import dataclasses

import pytest

from concepts.errors import CustomDiffError, FailedPrecondition, InvalidArgument, NotFound
from engine.request import GenerationRequest
from services.inference.triton_protocol import ModelSettings, error_from_text, error_text

DIGEST = "ab" * 32


@pytest.mark.parametrize("field, value, message", [
    ("prompt", None, "wrong type NoneType"),
    ("concept_digests", "abc", "expected a sequence"),
    ("concept_digests", ("xyz",), "64 hex characters"),
    ("concept_digests", (DIGEST, "sha256:" + DIGEST.upper()), "named twice"),
    ("concept_weights", "0.5", "expected a sequence"),
    ("concept_weights", (0.5,), "one weight per concept digest (0), got 1"),
    ("num_images", 0, "within [1, 8], got 0"),
    ("num_images", 9, "got 9"),
    ("num_images", True, "wrong type bool"),
    ("num_inference_steps", 151, "within [1, 150], got 151"),
    ("guidance_scale", -0.5, "got -0.5"),
    ("guidance_scale", 30.5, "within [0, 30]"),
    ("guidance_scale", float("nan"), "got nan"),
    ("seed", -1, "got -1"),
    ("height", 60, "multiple of 8"),
    ("width", 4096, "within [0, 2048], got 4096"),
    ("scheduler", "pndm", "got 'pndm'"),
])
def test_invalid_fields_are_named_with_the_value(field, value, message):
    with pytest.raises(InvalidArgument) as info:
        GenerationRequest(**{"prompt": "a dog", field: value})
    assert info.value.field.startswith(field) and message in str(info.value)


def test_valid_request_is_normalized():
    request = GenerationRequest("a dog", concept_digests=["sha256:" + DIGEST.upper()], guidance_scale=7)
    assert request.concept_digests == (DIGEST,) and request.guidance_scale == 7.0
    assert request.do_guidance and not dataclasses.replace(request, guidance_scale=1.0).do_guidance


def test_triton_parameters_round_trip_and_reject_unknown_keys():
    request = GenerationRequest("a <new1> dog", "blurry", (DIGEST, "cd" * 32), num_images=2, num_inference_steps=20,
                                guidance_scale=5.5, seed=42, height=64, width=128, scheduler="euler")
    params = request.to_parameters()
    assert params["concept_digests"] == f"{DIGEST},{'cd' * 32}" and "prompt" not in params
    assert GenerationRequest.from_parameters("a <new1> dog", "blurry", params) == request
    assert GenerationRequest.from_parameters("x", "", {}) == GenerationRequest("x")
    with pytest.raises(InvalidArgument) as info:
        GenerationRequest.from_parameters("x", "", {"steps": 3})
    assert info.value.field == "steps"


@pytest.mark.parametrize("weights, field, message", [
    ((0.5, float("nan")), "concept_weights[1]", "got nan"),
    ((float("inf"), 1), "concept_weights[0]", "got inf"),
    ((-0.1, 1), "concept_weights[0]", "within [0, 2], got -0.1"),
    ((1, 2.5), "concept_weights[1]", "got 2.5"),
    ((1, True), "concept_weights[1]", "wrong type bool"),
    ((1, "0.5"), "concept_weights[1]", "wrong type str"),
    ((1,), "concept_weights", "one weight per concept digest (2), got 1"),
])
def test_invalid_concept_weights_are_named_with_the_value(weights, field, message):
    with pytest.raises(InvalidArgument) as info:
        GenerationRequest("a dog", concept_digests=(DIGEST, "cd" * 32), concept_weights=weights)
    assert info.value.field == field and message in str(info.value)


def test_concept_weights_are_normalized_and_round_trip_exactly():
    digests = (DIGEST, "cd" * 32)
    request = GenerationRequest("a dog", concept_digests=digests, concept_weights=[0, 0.1 + 0.2])
    assert request.concept_weights == (0.0, 0.30000000000000004)
    assert request.weights == request.concept_weights
    assert request.to_parameters()["concept_weights"] == "0.0,0.30000000000000004"
    assert GenerationRequest.from_parameters("a dog", "", request.to_parameters()) == request
    # All ones is the default: the same request, and a parameter an older model would not know is left out.
    ones = GenerationRequest("a dog", concept_digests=digests, concept_weights=(1, 1.0))
    assert ones == GenerationRequest("a dog", concept_digests=digests) and ones.weights == (1.0, 1.0)
    assert "concept_weights" not in ones.to_parameters()
    for text, field in [("0.5,x", "concept_weights"), ("0.5,nan", "concept_weights[1]"),
                        ("3,1", "concept_weights[0]")]:
        params = {"concept_digests": ",".join(digests), "concept_weights": text}
        with pytest.raises(InvalidArgument) as info:
            GenerationRequest.from_parameters("a dog", "", params)
        assert info.value.field == field


def test_model_settings_from_config_with_environment_overrides():
    config = {"base_model": {"string_value": "/models/base"}, "store_url": {"string_value": "/store"},
              "cache_bytes": {"string_value": "1000"}, "dtype": {"string_value": "float16"}}
    settings = ModelSettings.from_config(config, {"CUSTOMDIFF_STORE_URL": "s3://bucket/store",
                                                  "CUSTOMDIFF_CACHE_BYTES": "2000"})
    assert (settings.base_model, settings.store_url, settings.cache_bytes, settings.dtype) == \
        ("/models/base", "s3://bucket/store", 2000, "float16")
    for bad, field in [({"cache_bytes": {"string_value": "1GB"}}, "cache_bytes"),
                       ({"colour": {"string_value": "red"}}, "colour"),
                       ({"dtype": {"string_value": "int8"}}, "dtype"),
                       ({"base_model": {"string_value": ""}}, "base_model")]:
        with pytest.raises(InvalidArgument) as info:
            ModelSettings.from_config({**config, **bad}, {})
        assert info.value.field == field


@pytest.mark.parametrize("error, cls", [
    (InvalidArgument("num_images", "must be within [1, 8], got 9"), InvalidArgument),
    (NotFound("no artifact with digest abc"), NotFound),
    (FailedPrecondition("wrong base"), FailedPrecondition),
    (CustomDiffError("boom"), CustomDiffError),
])
def test_error_text_round_trip(error, cls):
    text = "in model 'stable_diffusion': " + error_text(error)  # what Triton may put around it
    back = error_from_text(text)
    assert type(back) is cls and str(back) == str(error)
    if cls is InvalidArgument:
        assert back.field == "num_images"
    assert error_from_text("Request for unknown model") is None
