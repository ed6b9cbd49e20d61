"""Every RPC of every server needs an API key; tenant B never sees tenant A's concepts, jobs or blobs."""

import hashlib
import io

import grpc
import pytest
from PIL import Image

from customdiff_client import Client
from customdiffusion.v1 import concept_service_pb2 as cpb
from customdiffusion.v1 import inference_service_pb2 as ipb
from customdiffusion.v1 import merger_service_pb2 as mpb
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb
from concepts.store import ArtifactStore
from services.app import start_stack
from services.common.registry import Registry
from services.common.settings import Settings

CAT = resources_pb2.ConceptRef(name="cat")
BLOBS: dict[str, str] = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base_dir):
    """Clients of tenants a and b (and of no or a wrong key) on one stack; BLOBS names A's blobs."""
    tmp = tmp_path_factory.mktemp("auth")
    settings = Settings(database_url=f"sqlite:///{tmp}/registry.db", store_url=str(tmp / "store"),
                        work_dir=str(tmp / "jobs"), api_keys="key-a=tenant-a,key-b=tenant-b", trainer_port=0,
                        merger_port=0, inference_port=0, base_model=str(tiny_base_dir), triton_url="127.0.0.1:1")
    stack = start_stack(settings)
    registry = Registry(settings.database_url)
    registry.add_concept("tenant-a", "cat", "c" * 64, ["<new1>"], ["cat"], 1, "fp", {"kind": "training"})
    # A training image tenant A sent (16x16: too small to train on, so A's own use fails on its content).
    store = ArtifactStore(settings.store_url)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    image = store.put(buf.getvalue())
    registry.own_blobs("tenant-a", {image: len(buf.getvalue())})
    artifact = store.put(b"a concept artifact of tenant A")
    registry.add_concept("tenant-a", "dog", artifact, ["<new2>"], ["dog"], 30, "fp", {"kind": "training"})
    training, _ = registry.create_job("tenant-a", "training", "", "cat", {})
    merge, _ = registry.create_job("tenant-a", "merge", "", "cat", {})
    targets = [f"127.0.0.1:{stack.ports[c]}" for c in ("trainer", "merger", "inference")]
    clients = {who: Client(*targets, api_key=key) for who, key in
               (("a", "key-a"), ("b", "key-b"), ("none", ""), ("wrong", "key-c"))}
    BLOBS.update(image=image, artifact=artifact)
    yield clients, training.id, merge.id, stack
    for c in clients.values():
        c.close()
    stack.stop(0)


def _every_rpc(client: Client, training_id: str, merge_id: str):
    t, m, i, c = client.trainer_stub, client.merger_stub, client.inference_stub, client.concept_stub
    calls = [
        (t.CreateTrainingJob, tpb.CreateTrainingJobRequest()),
        (t.GetTrainingJob, tpb.GetTrainingJobRequest(name=f"trainingJobs/{training_id}")),
        (t.ListTrainingJobs, tpb.ListTrainingJobsRequest()),
        (t.CancelTrainingJob, tpb.CancelTrainingJobRequest(name=f"trainingJobs/{training_id}")),
        (lambda r, **kw: list(t.WatchTrainingJob(r, **kw)), tpb.WatchTrainingJobRequest(name=f"trainingJobs/{training_id}")),
        (m.MergeConcepts, mpb.MergeConceptsRequest(concepts=[CAT, CAT])),
        (m.CompressConcept, mpb.CompressConceptRequest(concept=CAT, rank=1)),
        (m.GetMergerJob, mpb.GetMergerJobRequest(name=f"mergerJobs/{merge_id}")),
        (m.ListMergerJobs, mpb.ListMergerJobsRequest()),
        (lambda r, **kw: list(m.WatchMergerJob(r, **kw)), mpb.WatchMergerJobRequest(name=f"mergerJobs/{merge_id}")),
        (i.Generate, ipb.GenerateRequest(prompt="a <new1> cat", concepts=[CAT], num_inference_steps=2)),
        (c.ListConcepts, cpb.ListConceptsRequest()),
        (c.GetConcept, cpb.GetConceptRequest(concept=CAT)),
        (c.DeleteConcept, cpb.DeleteConceptRequest(concept=CAT)),
        (lambda r, **kw: t.UploadImages(iter([r]), **kw), tpb.UploadImagesRequest(data=b"x", end_of_image=True)),
        (lambda r, **kw: c.ImportConcept(iter([r]), **kw),
         cpb.ImportConceptRequest(header=cpb.ImportConceptHeader(concept_name="cat"))),
        (lambda r, **kw: list(c.ExportConcept(r, **kw)), cpb.ExportConceptRequest(concept=CAT)),
    ]
    # Every RPC of the API is here: a new one must be added (and so checked) too.
    assert len(calls) == sum(len(f.services_by_name[s].methods) for f, s in (
        (tpb.DESCRIPTOR, "TrainerService"), (mpb.DESCRIPTOR, "MergerService"),
        (ipb.DESCRIPTOR, "InferenceService"), (cpb.DESCRIPTOR, "ConceptService")))
    return calls


@pytest.mark.parametrize("who", ["none", "wrong"])
def test_every_rpc_without_a_valid_key_is_unauthenticated(env, who):
    clients, training_id, merge_id, _ = env
    client = clients[who]
    metadata = () if who == "none" else client.metadata
    for method, request in _every_rpc(client, training_id, merge_id):
        with pytest.raises(grpc.RpcError) as e:
            method(request, metadata=metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, request)


def test_tenant_b_sees_nothing_of_tenant_a(env):
    clients, training_id, merge_id, _ = env
    b = clients["b"]
    assert list(b.trainer_stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(), metadata=b.metadata).training_jobs) == []
    assert list(b.merger_stub.ListMergerJobs(mpb.ListMergerJobsRequest(), metadata=b.metadata).merger_jobs) == []
    assert b.concepts() == []
    not_found = [call for call in _every_rpc(b, training_id, merge_id)
                 if not isinstance(call[1], (tpb.CreateTrainingJobRequest, tpb.ListTrainingJobsRequest,
                                             mpb.ListMergerJobsRequest, cpb.ListConceptsRequest,
                                             tpb.UploadImagesRequest, cpb.ImportConceptRequest))]
    for method, request in not_found:  # get, cancel, watch, use in merge/compress/generate, delete, export
        with pytest.raises(grpc.RpcError) as e:
            method(request, metadata=b.metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, (type(request).__name__, e.value.details())
    a = clients["a"]  # and A's things are all still there
    assert [c.name for c in a.concepts()] == ["cat", "dog"]
    job = a.trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=f"trainingJobs/{training_id}"),
                                        metadata=a.metadata).training_job
    assert job.state == resources_pb2.JOB_STATE_QUEUED


def _train_with_uri(uri: str, field: str) -> tpb.CreateTrainingJobRequest:
    data = tpb.ImageInput(data=_png())
    ref = tpb.ImageInput(uri=uri)
    concept = tpb.ConceptSpec(name="mine", class_prompt="dog", images=[ref if field == "images" else data],
                              class_images=[ref] if field == "class_images" else [])
    return tpb.CreateTrainingJobRequest(concepts=[concept], hyperparameters=tpb.Hyperparameters(resolution=64))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("field", ["images", "class_images"])
@pytest.mark.parametrize("blob", ["image", "artifact"])
def test_tenant_b_cannot_name_tenant_a_blobs_and_nothing_of_them_is_read(env, monkeypatch, field, blob):
    clients, *_ = env
    digest = BLOBS[blob]
    reads = []
    get = ArtifactStore.get
    monkeypatch.setattr(ArtifactStore, "get", lambda self, d: reads.append(d) or get(self, d))
    b = clients["b"]
    with pytest.raises(grpc.RpcError) as e:
        b.trainer_stub.CreateTrainingJob(_train_with_uri(f"sha256:{digest}", field), metadata=b.metadata, timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    assert reads == []
    # The same answer as for a blob that does not exist: no size, no type, no hint that it exists.
    with pytest.raises(grpc.RpcError) as missing:
        b.trainer_stub.CreateTrainingJob(_train_with_uri("sha256:" + "0" * 64, field), metadata=b.metadata, timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    strip = lambda text: text.replace(digest, "D").replace("0" * 64, "D").split(" [request")[0]  # noqa: E731
    assert strip(e.value.details()) == strip(missing.value.details())
    assert "bytes" not in e.value.details() and "PNG" not in e.value.details()


def test_tenant_a_can_name_its_own_upload(env):
    clients, *_ = env
    a = clients["a"]
    with pytest.raises(grpc.RpcError) as e:
        a.trainer_stub.CreateTrainingJob(_train_with_uri(f"sha256:{BLOBS['image']}", "images"),
                                         metadata=a.metadata, timeout=30)
    # A's own image is read and judged on its content: 16x16 is below half the training resolution.
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith("concepts[0].images[0]: ") and "16x16" in e.value.details()


def test_ownership_is_per_tenant_for_one_deduplicated_blob(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path}/registry.db")
    registry.migrate()
    digest = hashlib.sha256(b"same bytes").hexdigest()
    registry.own_blobs("tenant-a", {digest: 10})
    assert registry.owns_blob("tenant-a", digest) and not registry.owns_blob("tenant-b", digest)
    registry.own_blobs("tenant-b", {digest: 10})
    registry.own_blobs("tenant-b", {digest: 10})  # twice is once
    assert registry.owns_blob("tenant-b", digest)
    assert registry.stored_bytes("tenant-a") == registry.stored_bytes("tenant-b") == 10
    # A concept's artifact is owned through the concept, and deleting it keeps a blob others own.
    registry.add_concept("tenant-a", "cat", digest, ["<new1>"], ["cat"], 10, "fp", {})
    assert registry.stored_bytes("tenant-a") == 10  # one blob, counted once
    _, unreferenced = registry.delete_concepts("tenant-a", "cat")
    assert unreferenced == []


def test_repeated_authorization_header_is_unauthenticated(env):
    clients, *_ = env
    a = clients["a"]
    twice = a.metadata + (("authorization", "Bearer key-b"),)
    same_twice = a.metadata + a.metadata
    for metadata in (twice, same_twice):
        with pytest.raises(grpc.RpcError) as e:
            a.concept_stub.ListConcepts(cpb.ListConceptsRequest(), metadata=metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [c.name for c in a.concepts()] == ["cat", "dog"]  # one header still works
