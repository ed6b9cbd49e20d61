"""The whole stack on loopback with a real tritonserver, through the gRPC API only:
train -> concept registered -> generate -> PNGs at the asked size; merge and compress -> generate."""

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from customdiff_client import Client
from customdiff.commands.demo import inputs, photos
from customdiff.local import start_serve
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base_dir):
    proc, ports = start_serve(tmp_path_factory.mktemp("e2e"), api_keys="key-e2e=e2e", base_model=str(tiny_base_dir),
                              max_concurrent_jobs=2)
    client = Client(*(f"127.0.0.1:{ports[c]}" for c in ("trainer", "merger", "inference")), api_key="key-e2e")
    yield client
    client.close()
    proc.terminate()
    assert proc.wait(timeout=120) == 0


def _train(client: Client, name: str):
    class_prompt = {c["name"]: c["class_prompt"] for c in inputs()["concepts"]}[name]
    concept = tpb.ConceptSpec(name=name, class_prompt=class_prompt, num_class_images=1,
                              images=[tpb.ImageInput(data=data) for data in photos(name)[:2]])
    events = []
    job = client.train([concept], hyperparameters=tpb.Hyperparameters(resolution=64, max_train_steps=4, effective_batch_size=2),
                       on_event=events.append)
    assert [e.training_job.state for e in events][0] in (resources_pb2.JOB_STATE_QUEUED, resources_pb2.JOB_STATE_RUNNING)
    assert max(e.training_job.progress.step for e in events) == 4
    return job


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_train_generate_merge_compress_generate(client):
    with ThreadPoolExecutor(2) as pool:
        square, ring = pool.map(lambda n: _train(client, n), ["striped-square", "two-tone-ring"])
    assert square.concept.name == "striped-square" and square.concept.version == 1
    assert {c.name for c in client.concepts()} == {"striped-square", "two-tone-ring"}

    response = client.generate("photo of a <new1> square", concepts=["striped-square"], num_images=2, seed=7,
                               num_inference_steps=3, height=64, width=48)
    assert [img.seed for img in response.images] == [7, 8]
    assert [_decode(img.png).size for img in response.images] == [(48, 64), (48, 64)]
    assert list(response.concept_digests) == [square.concept.digest]

    merged = client.merge(["striped-square", "two-tone-ring"], concept_name="both")
    assert merged.report.summary["residual"] <= 1e-4
    compressed = client.compress("both", fraction=0.6)
    assert compressed.concept.version == 2 and compressed.concept.provenance.kind == "compress"
    for version_digest in (merged.concept.digest, compressed.concept.digest):
        assert version_digest in {c.digest for c in client.concepts()}
    response = client.generate("a <new1> square and a <new2> ring", concepts=["both"], num_inference_steps=3,
                               height=64, width=64)
    assert _decode(response.images[0].png).size == (64, 64)
    assert list(response.concept_digests) == [compressed.concept.digest]  # the latest version: compressed
