"""ConceptService.ImportConcept and ExportConcept: Custom Diffusion checkpoints in and out through the API,
per tenant, checked against the deployment's base, and nothing half-written when an import fails."""

import dataclasses
import io
import tempfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from safetensors.torch import save as st_save

from concepts.artifact import concept_to_bytes
from concepts.base import load_base
from concepts.interop import WEIGHTS_NAME, export_diffusers
from concepts.store import ArtifactStore
from customdiffusion.v1 import concept_service_pb2 as cpb
from customdiffusion.v1 import concept_service_pb2_grpc
from customdiffusion.v1 import resources_pb2
from services.app import start_stack
from services.common import concept_interop
from services.common.registry import Registry
from services.common.settings import Quotas, Settings
from tests.conftest import bad_request_fields, random_concept

DIFFUSERS, ORIGINAL = cpb.CHECKPOINT_FORMAT_DIFFUSERS, cpb.CHECKPOINT_FORMAT_ORIGINAL
_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def _register(registry: Registry, store: ArtifactStore, tenant: str, name: str, concept) -> None:
    data = concept_to_bytes(concept)
    registry.add_concept(tenant, name, store.put(data), list(concept.tokens), list(concept.class_words), len(data),
                         concept.base_fingerprint, concept.provenance)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base_dir):
    """A trainer server (ConceptService mounted) with tenants a, b and c (c: a 1000-byte quota); tenant A has
    "cat" (dense deltas), "lowrank" (rank-2 factors) and "elsewhere" (made for another base)."""
    tmp = tmp_path_factory.mktemp("import-export")
    settings = Settings(database_url=f"sqlite:///{tmp}/registry.db", store_url=str(tmp / "store"),
                        work_dir=str(tmp / "jobs"), api_keys="key-a=tenant-a,key-b=tenant-b,key-c=tenant-c",
                        trainer_port=0, base_model=str(tiny_base_dir),
                        quotas=Quotas(tenants={"tenant-c": {"stored_bytes": 1000}}))
    stack = start_stack(settings, ("trainer",))
    registry, store, base = Registry(settings.database_url), ArtifactStore(settings.store_url), load_base(tiny_base_dir)
    sources = {"cat": random_concept(base, seed=31, token="<cat1>", class_word="cat"),
               "lowrank": random_concept(base, seed=32, token="<lr1>", rank=2)}
    for name, concept in sources.items():
        _register(registry, store, "tenant-a", name, concept)
    _register(registry, store, "tenant-a", "elsewhere",
              dataclasses.replace(random_concept(base, seed=33), base_fingerprint="0" * 32))
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports['trainer']}")
    stub = concept_service_pb2_grpc.ConceptServiceStub(channel)
    yield dict(settings=settings, stub=stub, registry=registry, store=store, base=base, sources=sources,
               channel=channel)
    channel.close()
    stack.stop(0)


def _key(tenant: str):
    return (("authorization", f"Bearer key-{tenant}"),)


def _export(stub, tenant: str, name: str, version: int = 0, **request) -> dict[str, bytes]:
    """The exported files by name, in the order streamed; checks the framing."""
    files: dict[str, bytes] = {}
    current = None
    for message in stub.ExportConcept(cpb.ExportConceptRequest(
            concept=resources_pb2.ConceptRef(name=name, version=version), **request), metadata=_key(tenant),
            timeout=60):
        if message.file_name:
            assert message.file_name not in files
            current = message.file_name
            files[current] = b""
        assert current is not None, "the first message names its file"
        files[current] += message.data
    return files


def _messages(header: cpb.ImportConceptHeader | None, files: dict[str, bytes], chunk: int = 1000):
    """An ImportConcept stream: the header alone, then every file in chunks, its name on its first."""
    if header is not None:
        yield cpb.ImportConceptRequest(header=header)
    for name, data in files.items():
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
        for j, piece in enumerate(pieces):
            yield cpb.ImportConceptRequest(file_name=name if j == 0 else "", data=piece)


def _import(stub, tenant: str, header: cpb.ImportConceptHeader, files: dict[str, bytes]) -> resources_pb2.Concept:
    return stub.ImportConcept(_messages(header, files), metadata=_key(tenant), timeout=60).concept


def _assert_same_concept(imported, source, base) -> None:
    """Deltas within float32 rounding of fl32(W0 + delta) - W0 (docs/artifact-format.md, "Round trip");
    tokens and embeddings bit-identical."""
    assert imported.tokens == source.tokens and torch.equal(imported.embeddings, source.embeddings)
    assert imported.base_fingerprint == base.fingerprint
    assert imported.deltas.keys() == source.deltas.keys()
    for name, delta in source.deltas.items():
        full = base.unet.get_submodule(name).weight + delta.to_dense()
        back = imported.deltas[name].to_dense()
        assert ((back - delta.to_dense()).abs() <= (full.abs() + back.abs()) * 2**-24).all(), name


@pytest.mark.parametrize("name", ["cat", "lowrank"])
def test_export_from_one_tenant_import_into_another_gives_the_same_concept(env, monkeypatch, name):
    stub, store, base, source = env["stub"], env["store"], env["base"], env["sources"][name]
    monkeypatch.setattr(concept_interop, "EXPORT_CHUNK_BYTES", 4096)  # several chunks per file
    chunks = list(stub.ExportConcept(cpb.ExportConceptRequest(concept=resources_pb2.ConceptRef(name=name)),
                                     metadata=_key("a"), timeout=60))
    assert all(len(c.data) <= 4096 for c in chunks) and len(chunks) > 2
    files = _export(stub, "a", name)
    token = source.tokens[0]
    assert list(files) == [WEIGHTS_NAME, f"{token}.safetensors"]  # the weights first, then the tokens

    concept = _import(stub, "b", cpb.ImportConceptHeader(concept_name=name, class_words=["dog"]), files)
    assert (concept.name, concept.version, list(concept.tokens)) == (name, 1, [token])
    assert concept.provenance.kind == "import" and concept.provenance.details["format"] == "diffusers"
    _assert_same_concept(store.get_concept(concept.digest), source, base)
    # Exported again by B, the files are the very same bytes (the deltas survive float32 exactly here).
    assert _export(stub, "b", name) == files


def test_an_original_delta_bin_imports(env):
    stub, store, base, source = env["stub"], env["store"], env["base"], env["sources"]["cat"]
    full = {f"{n}.weight": base.unet.get_submodule(n).weight + d.to_dense() for n, d in source.deltas.items()}
    buf = io.BytesIO()
    torch.save({"unet": full, "modifier_token": {"<cat1>": source.embeddings[0].clone()}}, buf)
    concept = _import(stub, "b", cpb.ImportConceptHeader(concept_name="from-original", format=ORIGINAL,
                                                         class_words=["cat"]), {"delta.bin": buf.getvalue()})
    assert concept.provenance.details["format"] == "original-diffusers" and list(concept.class_words) == ["cat"]
    _assert_same_concept(store.get_concept(concept.digest), source, base)


def test_another_tenants_concept_is_not_found_like_an_unknown_one(env):
    stub = env["stub"]
    errors = {}
    for name in ("elsewhere", "no-such-concept"):  # A's, and nobody's
        with pytest.raises(grpc.RpcError) as e:
            _export(stub, "b", name)
        errors[name] = e.value
    assert {e.code() for e in errors.values()} == {grpc.StatusCode.NOT_FOUND}
    texts = {e.details().replace(name, "N").split(" [request")[0] for name, e in errors.items()}
    assert len(texts) == 1, texts


def test_a_concept_of_another_base_is_failed_precondition(env):
    stub, base = env["stub"], env["base"]
    with pytest.raises(grpc.RpcError) as e:
        _export(stub, "a", "elsewhere")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert "0" * 32 in e.value.details() and base.fingerprint in e.value.details()


EXPORT_CASES = [
    ("format", dict(concept=resources_pb2.ConceptRef(name="cat"), format=ORIGINAL)),
    ("format", dict(concept=resources_pb2.ConceptRef(name="cat"), format=7)),
    ("concept.name", dict(concept=resources_pb2.ConceptRef(name="Not OK"))),
    ("concept.version", dict(concept=resources_pb2.ConceptRef(name="cat", version=-1))),
    ("concept.weight", dict(concept=resources_pb2.ConceptRef(name="cat", weight=0.5))),
]


@pytest.mark.parametrize("field, request_", EXPORT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(EXPORT_CASES)])
def test_export_bad_fields(env, field, request_):
    with pytest.raises(grpc.RpcError) as e:
        list(env["stub"].ExportConcept(cpb.ExportConceptRequest(**request_), metadata=_key("a"), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(e.value) == [field], e.value.details()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def diffusers_files(env, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("diffusers")
    return {p.name: p.read_bytes() for p in export_diffusers(env["sources"]["cat"], env["base"], out)}


def _header(**fields) -> cpb.ImportConceptHeader:
    return cpb.ImportConceptHeader(**{"concept_name": "imported", **fields})


def _import_cases(files: dict[str, bytes]):
    """(id, messages, field, text in the message) for bad ImportConcept streams."""
    token_file = "<cat1>.safetensors"
    one = lambda **kw: list(_messages(_header(**kw), files))  # noqa: E731
    return [
        ("no-header", list(_messages(None, files)), "header", "first message carries the header"),
        ("empty-stream", [], "header", "first message"),
        ("header-twice", [*one(), cpb.ImportConceptRequest(header=_header())], "header", "only the first"),
        ("concept_name", one(concept_name="Not OK"), "header.concept_name", "'Not OK'"),
        ("format", one(format=9), "header.format", "unknown format 9"),
        ("token", one(tokens=["<a b>"]), "header.tokens[0]", "without spaces"),
        ("tokens-twice", one(tokens=["<cat1>", "<cat1>"]), "header.tokens", "at most once"),
        ("class_words", one(tokens=["<cat1>"], class_words=["cat", "dog"]), "header.class_words", "one per token"),
        ("class_words-count", one(class_words=["cat", "dog"]), "header.class_words", "one per token"),
        ("request_id", one(request_id="r" * 200), "header.request_id", "at most 128"),
        ("missing-token", one(tokens=["<other>"]), "header.tokens", "the upload has no <other>.safetensors"),
        ("data-before-name", [cpb.ImportConceptRequest(header=_header(), data=b"x")], "file_name", "data came"),
        ("path-name", list(_messages(_header(), {"../delta.bin": b"x"})), "file_name", "plain file name"),
        ("sent-twice", [*one(), *_messages(None, {token_file: files[token_file]})], "file_name", "sent twice"),
        ("no-files", [cpb.ImportConceptRequest(header=_header())], "file_name", "send the checkpoint's files"),
        ("no-weights", list(_messages(_header(format=DIFFUSERS), {token_file: files[token_file]})), "file_name",
         f"one {WEIGHTS_NAME}"),
        ("stray-file", list(_messages(_header(), {**files, "README.md": b"hi"})), "file_name", "'README.md'"),
        ("two-originals", list(_messages(_header(format=ORIGINAL), {"a.bin": b"1", "b.bin": b"2"})), "file_name",
         "one delta.bin"),
        # torch's advice to load with weights_only=False does not reach the caller; its reason does
        ("garbage", list(_messages(_header(), {"delta.bin": b"\0not a checkpoint" * 8})), "data",
         "data: delta.bin: neither safetensors nor a readable torch checkpoint: Unsupported operand 0 [request"),
        ("pickled-code", list(_messages(_header(), {"delta.bin": _torch_bytes({"unet": {}, "x": np.zeros(3)})})),
         "data", "readable torch checkpoint: Unsupported global: GLOBAL numpy"),
        ("truncated", list(_messages(_header(), {**files, WEIGHTS_NAME: files[WEIGHTS_NAME][:5000]})), "data",
         f"{WEIGHTS_NAME}: unreadable safetensors"),
        ("shapes", list(_messages(_header(), {"delta.bin": _torch_bytes({"unet": {_K: torch.zeros(3, 3)}})})),
         "data", "must be (32, 32) like the base's"),
        ("not-this-base", list(_messages(_header(), {"delta.bin": _torch_bytes(
            {"unet": {"conv_in.weight": torch.zeros(3)}})})), "data", "not a cross-attention projection"),
        ("in-vocabulary", list(_messages(_header(), {"delta.bin": _torch_bytes(
            {"unet": {}, "modifier_token": {"dog</w>": torch.zeros(32)}})})), "data", "already exist"),
        ("token-with-space", list(_messages(_header(), {WEIGHTS_NAME: files[WEIGHTS_NAME], "my token.safetensors":
                                                       st_save({"my token": torch.zeros(32)})})),
         "file_name", "token 'my token': tokens are 1-64 characters without spaces"),
        ("odd-layout", list(_messages(_header(), {"delta.bin": _torch_bytes({"unet": {1: torch.zeros(3)}})})),
         "data", "do not have the layout"),
    ]


def _import_case_ids():
    return [c[0] for c in _import_cases({WEIGHTS_NAME: b"", "<cat1>.safetensors": b""})]


@pytest.mark.parametrize("case", _import_case_ids())
def test_bad_imports_are_refused_by_field_and_leave_nothing(env, diffusers_files, case):
    stub, registry, settings = env["stub"], env["registry"], env["settings"]
    _, messages, field, text = next(c for c in _import_cases(diffusers_files) if c[0] == case)
    blobs = sorted(p.name for p in (Path(settings.store_url) / "sha256").iterdir())
    concepts = [(c.name, c.version) for c in registry.list_concepts("tenant-b", limit=500)]
    temporary = set(Path(tempfile.gettempdir()).glob("customdiff-import-*"))
    with pytest.raises(grpc.RpcError) as e:
        stub.ImportConcept(iter(messages), metadata=_key("b"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert bad_request_fields(e.value) == [field], e.value.details()
    assert e.value.details().startswith(f"{field}: ") and text in e.value.details(), e.value.details()
    assert "customdiff-import-" not in e.value.details()  # the server's temporary paths stay on the server
    assert sorted(p.name for p in (Path(settings.store_url) / "sha256").iterdir()) == blobs
    assert [(c.name, c.version) for c in registry.list_concepts("tenant-b", limit=500)] == concepts
    assert set(Path(tempfile.gettempdir()).glob("customdiff-import-*")) == temporary


def test_an_import_over_the_size_cap_is_refused_as_it_arrives(env, diffusers_files, monkeypatch):
    monkeypatch.setattr(concept_interop, "MAX_IMPORT_BYTES", 10_000)
    with pytest.raises(grpc.RpcError) as e:
        _import(env["stub"], "b", _header(), diffusers_files)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(e.value) == ["data"]
    assert "exceed 10000 bytes" in e.value.details()


def test_an_import_over_the_stored_bytes_quota_stores_nothing(env, diffusers_files):
    registry, settings = env["registry"], env["settings"]
    blobs = sorted(p.name for p in (Path(settings.store_url) / "sha256").iterdir())
    with pytest.raises(grpc.RpcError) as e:
        _import(env["stub"], "c", _header(), diffusers_files)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "stored_bytes" in e.value.details()
    assert registry.list_concepts("tenant-c") == []
    assert sorted(p.name for p in (Path(settings.store_url) / "sha256").iterdir()) == blobs


def test_an_import_retried_with_its_request_id_registers_once(env, diffusers_files):
    stub, registry = env["stub"], env["registry"]
    first = _import(stub, "a", _header(concept_name="retried", request_id="import-1"), diffusers_files)
    # The retry's files are not even read: the first import's version comes back.
    again = _import(stub, "a", _header(concept_name="retried", request_id="import-1"), {"delta.bin": b"garbage"})
    assert (again.version, again.digest) == (first.version, first.digest) == (1, again.digest)
    assert first.provenance.details["request_id"] == "import-1"
    other = _import(stub, "a", _header(concept_name="retried", request_id="import-2"), diffusers_files)
    assert other.version == 2 and other.digest == first.digest
    assert [c.version for c in registry.list_concepts("tenant-a", "retried")] == [1, 2]


def test_without_a_key_import_and_export_are_unauthenticated(env, diffusers_files):
    stub = env["stub"]
    calls = [lambda: stub.ImportConcept(_messages(_header(), diffusers_files), timeout=30),
             lambda: list(stub.ExportConcept(cpb.ExportConceptRequest(concept=resources_pb2.ConceptRef(name="cat")),
                                             timeout=30))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_lists_the_streaming_rpcs(env):
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(env["channel"]))
    concepts = pool.FindServiceByName("customdiffusion.v1.ConceptService").methods_by_name
    trainer = pool.FindServiceByName("customdiffusion.v1.TrainerService").methods_by_name
    shapes = {name: (m.client_streaming, m.server_streaming) for name, m in
              [("ImportConcept", concepts["ImportConcept"]), ("ExportConcept", concepts["ExportConcept"]),
               ("UploadImages", trainer["UploadImages"])]}
    assert shapes == {"ImportConcept": (True, False), "ExportConcept": (False, True), "UploadImages": (True, False)}
