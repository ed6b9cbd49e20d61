"""Auth, error mapping, tenancy and ConceptService on a real gRPC server on loopback."""

import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from customdiffusion.v1 import concept_service_pb2 as cpb
from customdiffusion.v1 import concept_service_pb2_grpc, resources_pb2
from services.app import start_stack
from services.common.registry import Registry
from services.common.settings import Settings

KEYS = {"A": ("key-a", "tenant-a"), "B": ("key-b", "tenant-b")}


@pytest.fixture()
def stack(tmp_path, tiny_base_dir):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=str(tmp_path / "store"),
                        work_dir=str(tmp_path / "jobs"), api_keys="key-a=tenant-a,key-b=tenant-b",
                        trainer_port=0, merger_port=0, inference_port=0, base_model=str(tiny_base_dir))
    stack = start_stack(settings, components=("merger",))
    yield settings, stack
    stack.stop(0)


def _stub(stack, who=None):
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports['merger']}")
    metadata = (("authorization", f"Bearer {KEYS[who][0]}"),) if who else ()
    return concept_service_pb2_grpc.ConceptServiceStub(channel), metadata, channel


def _register(settings, tenant, name, digest):
    return Registry(settings.database_url).add_concept(tenant, name, digest, ["<new1>"], ["dog"], 123, "fp",
                                                       {"kind": "training", "job": "trainingJobs/x"})


def test_missing_or_wrong_key_is_unauthenticated_but_health_is_open(stack):
    settings, st = stack
    stub, _, channel = _stub(st)
    for metadata in [(), (("authorization", "Bearer nope"),), (("authorization", "key-a"),)]:
        with pytest.raises(grpc.RpcError) as e:
            stub.ListConcepts(cpb.ListConceptsRequest(), metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tenant_b_cannot_list_get_or_delete_tenant_a_concepts(stack):
    settings, st = stack
    _register(settings, "tenant-a", "dog", "a" * 64)
    stub_a, md_a, _ = _stub(st, "A")
    stub_b, md_b, _ = _stub(st, "B")
    assert [c.name for c in stub_a.ListConcepts(cpb.ListConceptsRequest(), metadata=md_a).concepts] == ["dog"]
    assert list(stub_b.ListConcepts(cpb.ListConceptsRequest(), metadata=md_b).concepts) == []
    ref = resources_pb2.ConceptRef(name="dog")
    for call in (lambda: stub_b.GetConcept(cpb.GetConceptRequest(concept=ref), metadata=md_b),
                 lambda: stub_b.DeleteConcept(cpb.DeleteConceptRequest(concept=ref), metadata=md_b)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "tenant" not in e.value.details()
    got = stub_a.GetConcept(cpb.GetConceptRequest(concept=ref), metadata=md_a).concept
    assert (got.version, got.digest, got.provenance.kind) == (1, "a" * 64, "training")


def test_paging_and_delete_versions(stack):
    settings, st = stack
    for i in range(5):
        _register(settings, "tenant-a", "cat", f"{i}" * 64)
    stub, md, _ = _stub(st, "A")
    first = stub.ListConcepts(cpb.ListConceptsRequest(page_size=2), metadata=md)
    second = stub.ListConcepts(cpb.ListConceptsRequest(page_size=2, page_token=first.next_page_token), metadata=md)
    assert [c.version for c in first.concepts] == [1, 2] and [c.version for c in second.concepts] == [3, 4]
    deleted = stub.DeleteConcept(cpb.DeleteConceptRequest(concept=resources_pb2.ConceptRef(name="cat", version=2)),
                                 metadata=md).deleted
    assert [c.version for c in deleted] == [2]
    latest = stub.GetConcept(cpb.GetConceptRequest(concept=resources_pb2.ConceptRef(name="cat")), metadata=md)
    assert latest.concept.version == 5


@pytest.mark.parametrize("request_, field", [
    (cpb.GetConceptRequest(concept=resources_pb2.ConceptRef(name="")), "concept.name"),
    (cpb.GetConceptRequest(concept=resources_pb2.ConceptRef(name="Bad Name")), "concept.name"),
    (cpb.GetConceptRequest(concept=resources_pb2.ConceptRef(name="dog", version=-1)), "concept.version"),
    (cpb.ListConceptsRequest(page_size=-1), "page_size"),
    (cpb.ListConceptsRequest(page_token="%%%"), "page_token"),
])
def test_bad_fields_are_invalid_argument_with_bad_request(stack, request_, field):
    _, st = stack
    stub, md, _ = _stub(st, "A")
    method = stub.GetConcept if isinstance(request_, cpb.GetConceptRequest) else stub.ListConcepts
    with pytest.raises(grpc.RpcError) as e:
        method(request_, metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(e.value)
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert [v.field for v in bad.field_violations] == [field]


def test_tls_when_configured(tmp_path, tiny_base_dir):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    settings = Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=str(tmp_path / "store"),
                        work_dir=str(tmp_path / "jobs"), api_keys="key-a=tenant-a", merger_port=0,
                        base_model=str(tiny_base_dir), tls_cert_file=str(cert), tls_key_file=str(key))
    st = start_stack(settings, components=("merger",))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        secure = grpc.secure_channel(f"localhost:{st.ports['merger']}", credentials)
        stub = concept_service_pb2_grpc.ConceptServiceStub(secure)
        assert list(stub.ListConcepts(cpb.ListConceptsRequest(), metadata=(("authorization", "Bearer key-a"),),
                                      timeout=10).concepts) == []
        plain = concept_service_pb2_grpc.ConceptServiceStub(grpc.insecure_channel(f"localhost:{st.ports['merger']}"))
        with pytest.raises(grpc.RpcError) as e:
            plain.ListConcepts(cpb.ListConceptsRequest(), metadata=(("authorization", "Bearer key-a"),), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        st.stop(0)


def test_stop_signals_catch_a_signal_sent_before_wait_and_many_at_once():
    """SIGTERM right after start-up, before anyone waits, still ends in a clean exit; a burst does not hang."""
    code = ("import os, signal; from services.common.server import StopSignals\n"
            "stop = StopSignals()\n"
            "for _ in range(50): os.kill(os.getpid(), signal.SIGTERM)\n"
            "stop.wait(); print('drained')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "drained"), result.stderr


def test_with_no_base_model_the_tiny_base_is_built_locally_even_for_an_object_store_work_dir(tmp_path, monkeypatch):
    import tempfile

    from services.app import resolve_base_model

    monkeypatch.chdir(tmp_path)  # a relative "s3:/..." directory made by mistake would land here
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    base = resolve_base_model(Settings(work_dir="s3://bucket/customdiff/jobs"))
    assert base == str(tmp_path / "tmp" / "customdiff" / "tiny-base")
    assert (tmp_path / "tmp" / "customdiff" / "tiny-base" / "model_index.json").exists()
    assert not (tmp_path / "s3:").exists()
    assert resolve_base_model(Settings(work_dir=str(tmp_path / "data" / "jobs"))) == str(tmp_path / "data" / "tiny-base")
