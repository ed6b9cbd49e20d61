"""TrainerService.UploadImages: images streamed in chunks, checked like CreateTrainingJob's, stored only when
every image passes, and named by reference in CreateTrainingJob by their owner only."""

import hashlib
import io
import itertools
import struct
import zlib
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from concepts.errors import InvalidArgument
from concepts.store import ArtifactStore
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb
from customdiffusion.v1 import trainer_service_pb2_grpc
from services.app import start_stack
from services.common.quotas import TenantQuotas
from services.common.registry import Registry
from services.common.settings import Quotas, Settings
from services.trainer.uploads import ImageUploads
from tests.conftest import bad_request_fields
from tests.trainer_helpers import stripes_png

MAX_IMAGES = 3
MAX_IMAGE_BYTES = 64 * 1024
SEEDS = itertools.count(100)  # a new image for every case, so "nothing stored" is about that image


def _png(seed: int | None = None) -> bytes:
    """A 64x64 striped PNG whose colors differ by `seed` (default: a new one)."""
    seed = next(SEEDS) if seed is None else seed
    img = Image.open(io.BytesIO(stripes_png(seed % 8)))
    img.putpixel((0, 0), (seed % 251, seed // 251 % 251, 77))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _noise_png(size: int) -> bytes:
    """A PNG of random pixels: it does not compress, so `size` x `size` x 3 bytes and more."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def _png_1bit(width: int, height: int) -> bytes:
    """A few KB of valid black 1-bit PNG declaring width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compressobj(9)
    idat = b"".join(rows.compress(b"\0" * (1 + (width + 7) // 8)) for _ in range(height)) + rows.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _chunks(*images: bytes, size: int = 300):
    """UploadImagesRequests: each image in chunks of `size` bytes, the last with end_of_image."""
    for image in images:
        pieces = [image[i:i + size] for i in range(0, len(image), size)] or [b""]
        for j, piece in enumerate(pieces):
            yield tpb.UploadImagesRequest(data=piece, end_of_image=j == len(pieces) - 1)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base_dir):
    tmp = tmp_path_factory.mktemp("upload")
    settings = Settings(database_url=f"sqlite:///{tmp}/registry.db", store_url=str(tmp / "store"),
                        work_dir=str(tmp / "jobs"), api_keys="key-a=tenant-a,key-b=tenant-b,key-c=tenant-c",
                        trainer_port=0, base_model=str(tiny_base_dir), max_images_per_concept=MAX_IMAGES,
                        max_image_bytes=MAX_IMAGE_BYTES,
                        quotas=Quotas(tenants={"tenant-c": {"stored_bytes": 500}}))
    stack = start_stack(settings, ("trainer",))
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports['trainer']}")
    stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
    yield settings, stub, Registry(settings.database_url), ArtifactStore(settings.store_url)
    channel.close()
    stack.stop(0)


def _key(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer key-{tenant}"),)


def test_upload_then_train_by_reference(env):
    settings, stub, registry, store = env
    images = [_png(1), _png(2), _jpeg()]
    response = stub.UploadImages(_chunks(*images, size=257), metadata=_key("a"), timeout=30)
    assert [i.uri for i in response.images] == [f"sha256:{_digest(d)}" for d in images]
    assert [(i.size_bytes, i.width, i.height, i.mime_type) for i in response.images] == [
        (len(images[0]), 64, 64, "image/png"), (len(images[1]), 64, 64, "image/png"),
        (len(images[2]), 48, 32, "image/jpeg")]
    for image in images:
        assert store.get(_digest(image)) == image and registry.owns_blob("tenant-a", _digest(image))
    # The same bytes again, one image in one message: the same reference, stored once.
    again = stub.UploadImages(iter([tpb.UploadImagesRequest(data=images[0], end_of_image=True)]),
                              metadata=_key("a"), timeout=30)
    assert again.images[0].uri == response.images[0].uri

    request = tpb.CreateTrainingJobRequest(
        concepts=[tpb.ConceptSpec(name="stripes", class_prompt="square", num_class_images=2,
                                  images=[tpb.ImageInput(uri=i.uri) for i in response.images[:2]])],
        hyperparameters=tpb.Hyperparameters(resolution=64, max_train_steps=2, train_batch_size=1,
                                             effective_batch_size=1))
    job = stub.CreateTrainingJob(request, metadata=_key("a"), timeout=60).training_job
    try:
        assert job.state in (resources_pb2.JOB_STATE_QUEUED, resources_pb2.JOB_STATE_RUNNING)
        recorded = registry.get_job(job.name.removeprefix("trainingJobs/")).request["concepts"][0]["images"]
        assert recorded == [i.uri for i in response.images[:2]]
    finally:  # the test is about naming the uploads; the training itself is covered elsewhere
        stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name), metadata=_key("a"), timeout=30)


def test_another_tenants_reference_is_not_found_like_an_unknown_one(env):
    _, stub, registry, _ = env
    image = _png()
    uri = stub.UploadImages(_chunks(image), metadata=_key("a"), timeout=30).images[0].uri

    def train_with(uri_: str) -> grpc.RpcError:
        request = tpb.CreateTrainingJobRequest(concepts=[tpb.ConceptSpec(
            name="mine", class_prompt="dog", images=[tpb.ImageInput(uri=uri_)])],
            hyperparameters=tpb.Hyperparameters(resolution=64))
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateTrainingJob(request, metadata=_key("b"), timeout=30)
        return e.value

    theirs, unknown = train_with(uri), train_with("sha256:" + "0" * 64)
    assert theirs.code() == unknown.code() == grpc.StatusCode.NOT_FOUND
    def strip(error: grpc.RpcError) -> str:
        return error.details().replace(_digest(image), "D").replace("0" * 64, "D").split(" [request")[0]

    assert strip(theirs) == strip(unknown)
    assert registry.list_jobs("tenant-b", "training") == []


def _bad_streams():
    """(name, messages, the field refused); each starts with a good image that must not be stored."""
    return [
        ("bad-second-image", lambda good: _chunks(good, b"not an image at all"), "images[1]"),
        ("too-many-images", lambda good: _chunks(good, *[_png() for _ in range(MAX_IMAGES)]), "images"),
        ("too-large-image", lambda good: _chunks(good, _noise_png(160), size=16 * 1024), "images[1]"),
        ("bomb-png", lambda good: _chunks(good, _png_1bit(20000, 20000)), "images[1]"),
        ("ends-inside-an-image", lambda good: itertools.chain(
            _chunks(good), [tpb.UploadImagesRequest(data=_png()[:100])]), "images[1]"),
        ("empty-image", lambda good: _chunks(good, b""), "images[1]"),
    ]


@pytest.mark.parametrize("name, messages, field", _bad_streams(), ids=[c[0] for c in _bad_streams()])
def test_bad_uploads_are_refused_by_field_and_leave_nothing(env, name, messages, field):
    settings, stub, registry, store = env
    good = _png()
    blobs = sorted(p.name for p in (Path(settings.store_url) / "sha256").iterdir())
    used = registry.stored_bytes("tenant-a")
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadImages(messages(good), metadata=_key("a"), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert bad_request_fields(e.value) == [field], e.value.details()
    assert e.value.details().startswith(f"{field}: ") and len(e.value.details()) < 400
    assert not store.exists(_digest(good)) and not registry.owns_blob("tenant-a", _digest(good))
    assert sorted(p.name for p in (Path(settings.store_url) / "sha256").iterdir()) == blobs
    assert registry.stored_bytes("tenant-a") == used


def test_an_empty_stream_is_invalid_argument(env):
    _, stub, *_ = env
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadImages(iter([]), metadata=_key("a"), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(e.value) == ["images"]


def test_over_the_stored_bytes_quota_nothing_is_stored(env):
    settings, stub, registry, store = env
    images = [_png(), _png()]  # under 250 bytes each: 2 fit in tenant-c's 500 bytes, 4 do not
    assert all(150 < len(i) < 250 for i in images)
    stub.UploadImages(_chunks(*images), metadata=_key("c"), timeout=30)
    used = registry.stored_bytes("tenant-c")
    more = [_png(), _png()]
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadImages(_chunks(*images, *more), metadata=_key("c"), timeout=30)  # owned ones count once
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    quota = error_details_pb2.QuotaFailure()
    assert any(d.Unpack(quota) for d in rpc_status.from_call(e.value).details if d.Is(quota.DESCRIPTOR))
    assert quota.violations[0].subject == "tenant:tenant-c"
    assert quota.violations[0].description.startswith("stored_bytes")
    assert not any(store.exists(_digest(i)) for i in more) and registry.stored_bytes("tenant-c") == used
    # Images the tenant owns already cost nothing.
    stub.UploadImages(_chunks(*images), metadata=_key("c"), timeout=30)


def test_without_a_key_uploads_are_unauthenticated(env):
    _, stub, *_ = env
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadImages(_chunks(_png()), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_oversized_image_is_refused_before_the_rest_arrives(tmp_path):
    settings = Settings(max_image_bytes=1000, max_images_per_concept=2)
    registry = Registry(f"sqlite:///{tmp_path}/registry.db")
    registry.migrate()
    uploads = ImageUploads(settings.trainer(), registry, ArtifactStore(str(tmp_path / "store")),
                           TenantQuotas(settings.quotas, registry))
    pulled = []

    def chunks():
        for i in range(100):
            pulled.append(i)
            yield b"x" * 400, False

    with pytest.raises(InvalidArgument) as e:
        uploads.upload("tenant-a", chunks())
    assert e.value.field == "images[0]" and "at least 1200 bytes" in e.value.description
    assert pulled == [0, 1, 2]  # the third chunk crossed the limit; nothing after it was read
    with pytest.raises(InvalidArgument, match="at most 2 images"):
        uploads.upload("tenant-a", iter([(_png(), True)] * 3))
    assert registry.stored_bytes("tenant-a") == 0
