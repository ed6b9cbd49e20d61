"""MergerService over gRPC: merge and compress run as jobs, results are registered concepts."""

import pytest

from concepts.store import ArtifactStore
from customdiff_client import Client, JobFailed
from customdiffusion.v1 import merger_service_pb2 as mpb
from customdiffusion.v1 import resources_pb2
from services.app import start_stack
from services.common.registry import Registry
from services.common.settings import Settings
from tests.conftest import random_concept


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base_dir):
    from concepts.base import load_base

    tmp = tmp_path_factory.mktemp("merger-service")
    settings = Settings(database_url=f"sqlite:///{tmp}/registry.db", store_url=str(tmp / "store"),
                        work_dir=str(tmp / "jobs"), api_keys="key-a=tenant-a", merger_port=0,
                        base_model=str(tiny_base_dir))
    base = load_base(tiny_base_dir)
    store, registry = ArtifactStore(settings.store_url), Registry(settings.database_url)
    registry.migrate()
    for i, (name, word) in enumerate([("dog", "dog"), ("cat", "cat")]):
        concept = random_concept(base, seed=10 + i, class_word=word)  # both use token <new1>
        digest = store.put_concept(concept)
        registry.add_concept("tenant-a", name, digest, list(concept.tokens), [word], 1, base.fingerprint, {})
    stack = start_stack(settings, components=("merger",))
    target = f"127.0.0.1:{stack.ports['merger']}"
    client = Client(target, target, target, api_key="key-a")
    yield settings, client
    client.close()
    stack.stop(0)


def test_merge_then_compress_register_new_concepts_with_reports(env):
    settings, client = env
    merged = client.merge(["dog", "cat"], concept_name="pets")
    assert merged.state == resources_pb2.JOB_STATE_SUCCEEDED
    assert merged.concept.name == "pets" and list(merged.concept.tokens) == ["<new1>", "<new2>"]
    assert list(merged.report.renamed_tokens) == ["<new1> -> <new2>"]
    assert merged.report.summary["residual"] <= 1e-4 < merged.report.summary["naive_residual"]
    assert len(merged.report.layers) == 14 and merged.concept.provenance.kind == "merge"
    assert len(merged.concept.provenance.parent_digests) == 2

    compressed = client.compress("pets", rank=2)
    assert compressed.state == resources_pb2.JOB_STATE_SUCCEEDED
    assert compressed.concept.name == "pets" and compressed.concept.version == 2
    assert {layer.rank for layer in compressed.report.layers} == {2}
    assert compressed.report.summary["bytes_after"] < compressed.report.summary["bytes_before"]
    stored = ArtifactStore(settings.store_url).get_concept(compressed.concept.digest)
    assert {d.rank for d in stored.deltas.values()} == {2}
    assert stored.provenance["metric"] == "features"  # a merge of the service's base: feature-weighted


def test_same_request_id_gives_one_job_and_list_shows_it(env):
    _, client = env
    request = mpb.CompressConceptRequest(concept=resources_pb2.ConceptRef(name="dog"), fraction=0.6,
                                         request_id="compress-dog-once")
    first = client.merger_stub.CompressConcept(request, metadata=client.metadata).merger_job
    second = client.merger_stub.CompressConcept(request, metadata=client.metadata).merger_job
    assert first.name == second.name
    names = [j.name for j in client.merger_stub.ListMergerJobs(mpb.ListMergerJobsRequest(),
                                                               metadata=client.metadata).merger_jobs]
    assert names.count(first.name) == 1


def test_failed_merge_reports_the_reason(env):
    settings, client = env
    from concepts.base import load_base
    from concepts.tiny import create_tiny_base

    other = load_base(create_tiny_base(f"{settings.work_dir}/../other-base", seed=1))
    digest = ArtifactStore(settings.store_url).put_concept(random_concept(other, seed=3))
    Registry(settings.database_url).add_concept("tenant-a", "alien", digest, ["<new1>"], ["dog"], 1,
                                                other.fingerprint, {})
    with pytest.raises(JobFailed, match=other.fingerprint):
        client.merge(["dog", "alien"])
