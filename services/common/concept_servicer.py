"""ConceptService: list, get and delete the caller's concepts. Mounted on every server."""

from __future__ import annotations

from concepts.errors import InvalidArgument
from concepts.store import ArtifactStore
from customdiffusion.v1 import concept_service_pb2 as pb
from customdiffusion.v1 import concept_service_pb2_grpc
from services.common.convert import check_name, concept_to_proto, next_page_token, page
from services.common.interceptors import current_tenant
from services.common.registry import Registry
from services.common.server import Service


class ConceptServicer(concept_service_pb2_grpc.ConceptServiceServicer):
    def __init__(self, registry: Registry, store: ArtifactStore) -> None:
        self.registry = registry
        self.store = store

    def ListConcepts(self, request: pb.ListConceptsRequest, context) -> pb.ListConceptsResponse:
        if request.name:
            check_name(request.name, "name")
        offset, limit = page(request.page_size, request.page_token)
        rows = self.registry.list_concepts(current_tenant(), request.name, offset, limit)
        return pb.ListConceptsResponse(concepts=[concept_to_proto(r) for r in rows],
                                       next_page_token=next_page_token(offset, limit, len(rows)))

    def GetConcept(self, request: pb.GetConceptRequest, context) -> pb.GetConceptResponse:
        ref = check_ref(request.concept, "concept")
        return pb.GetConceptResponse(concept=concept_to_proto(
            self.registry.get_concept(current_tenant(), ref.name, ref.version)))

    def DeleteConcept(self, request: pb.DeleteConceptRequest, context) -> pb.DeleteConceptResponse:
        ref = check_ref(request.concept, "concept")
        rows, unreferenced = self.registry.delete_concepts(current_tenant(), ref.name, ref.version)
        for digest in unreferenced:  # artifacts are shared by digest; delete only what nothing uses
            self.store.delete(digest)
        return pb.DeleteConceptResponse(deleted=[concept_to_proto(r) for r in rows])


def check_ref(ref, field: str, weighted: bool = False):
    """Validate a ConceptRef message: a valid name, a version >= 0 (0 is the latest), and no `weight`
    unless the RPC reads one (`weighted`: Generate); a weight elsewhere would be silently ignored."""
    check_name(ref.name, f"{field}.name")
    if ref.version < 0:
        raise InvalidArgument(f"{field}.version", f"must be >= 0 (0 is the latest), got {ref.version}")
    if not weighted and ref.HasField("weight"):
        raise InvalidArgument(f"{field}.weight", "only Generate reads a concept weight; leave it unset here")
    return ref


def concept_service(registry: Registry, store: ArtifactStore) -> Service:
    return Service(concept_service_pb2_grpc.add_ConceptServiceServicer_to_server,
                   ConceptServicer(registry, store), pb.DESCRIPTOR.services_by_name["ConceptService"].full_name)
