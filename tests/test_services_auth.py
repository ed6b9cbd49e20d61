"""Every RPC of every server needs an API key; tenant B never sees tenant A's concepts or jobs."""

import grpc
import pytest

from customdiff.client import Client
from customdiffusion.v1 import concept_service_pb2 as cpb
from customdiffusion.v1 import inference_service_pb2 as ipb
from customdiffusion.v1 import merger_service_pb2 as mpb
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb
from services.app import start_stack
from services.common.registry import Registry
from services.common.settings import Settings

CAT = resources_pb2.ConceptRef(name="cat")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base_dir):
    tmp = tmp_path_factory.mktemp("auth")
    settings = Settings(database_url=f"sqlite:///{tmp}/registry.db", store_url=str(tmp / "store"),
                        work_dir=str(tmp / "jobs"), api_keys="key-a=tenant-a,key-b=tenant-b", trainer_port=0,
                        merger_port=0, inference_port=0, base_model=str(tiny_base_dir), triton_url="127.0.0.1:1")
    stack = start_stack(settings)
    registry = Registry(settings.database_url)
    registry.add_concept("tenant-a", "cat", "c" * 64, ["<new1>"], ["cat"], 1, "fp", {"kind": "training"})
    training, _ = registry.create_job("tenant-a", "training", "", "cat", {})
    merge, _ = registry.create_job("tenant-a", "merge", "", "cat", {})
    targets = [f"127.0.0.1:{stack.ports[c]}" for c in ("trainer", "merger", "inference")]
    clients = {who: Client(*targets, api_key=key) for who, key in
               (("a", "key-a"), ("b", "key-b"), ("none", ""), ("wrong", "key-c"))}
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
    ]
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
                                             mpb.ListMergerJobsRequest, cpb.ListConceptsRequest))]
    for method, request in not_found:  # get, cancel, watch, use in merge/compress/generate, delete
        with pytest.raises(grpc.RpcError) as e:
            method(request, metadata=b.metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, (type(request).__name__, e.value.details())
    a = clients["a"]  # and A's things are all still there
    assert [c.name for c in a.concepts()] == ["cat"]
    job = a.trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=f"trainingJobs/{training_id}"),
                                        metadata=a.metadata).training_job
    assert job.state == resources_pb2.JOB_STATE_QUEUED
