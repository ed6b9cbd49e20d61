"""ConceptService: list, get, delete, import and export the caller's concepts. Mounted on every server."""

from __future__ import annotations

from collections.abc import Callable

from concepts.base import BaseModel
from concepts.errors import InvalidArgument, quote
from concepts.store import ArtifactStore
from customdiffusion.v1 import concept_service_pb2 as pb
from customdiffusion.v1 import concept_service_pb2_grpc
from services.common.concept_interop import TOKEN, ConceptInterop, ImportHeader
from services.common.convert import check_name, concept_to_proto, next_page_token, page
from services.common.interceptors import current_tenant
from services.common.quotas import TenantQuotas
from services.common.registry import Registry
from services.common.server import Service

IMPORT_FORMATS = {pb.CHECKPOINT_FORMAT_UNSPECIFIED: None, pb.CHECKPOINT_FORMAT_DIFFUSERS: "diffusers",
                  pb.CHECKPOINT_FORMAT_ORIGINAL: "original"}
MAX_TOKENS = 64
MAX_TEXT = 1000


class ConceptServicer(concept_service_pb2_grpc.ConceptServiceServicer):
    def __init__(self, registry: Registry, store: ArtifactStore, interop: ConceptInterop) -> None:
        self.registry = registry
        self.store = store
        self.interop = interop

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

    def ImportConcept(self, request_iterator, context) -> pb.ImportConceptResponse:
        messages = iter(request_iterator)
        first = next(messages, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("header", "the first message carries the header (concept_name, format, ...); "
                                            "the checkpoint's files follow")
        header = _import_header(first.header)

        def chunks():
            yield first.file_name, first.data
            for message in messages:
                if message.HasField("header"):
                    raise InvalidArgument("header", "only the first message carries the header")
                yield message.file_name, message.data

        return pb.ImportConceptResponse(concept=concept_to_proto(
            self.interop.import_files(current_tenant(), header, chunks())))

    def ExportConcept(self, request: pb.ExportConceptRequest, context):
        ref = check_ref(request.concept, "concept")
        if request.format == pb.CHECKPOINT_FORMAT_ORIGINAL:
            raise InvalidArgument("format", "only CHECKPOINT_FORMAT_DIFFUSERS is exported")
        if request.format not in IMPORT_FORMATS:
            raise InvalidArgument("format", f"unknown format {request.format}")
        chunks = self.interop.export_files(current_tenant(), ref.name, ref.version)  # checks before the first chunk
        for file_name, data in chunks:
            yield pb.ExportConceptResponse(file_name=file_name, data=data)


def _import_header(header: pb.ImportConceptHeader) -> ImportHeader:
    """Check every header field before any file is read."""
    check_name(header.concept_name, "header.concept_name")
    if header.format not in IMPORT_FORMATS:
        raise InvalidArgument("header.format", f"unknown format {header.format}")
    for key in ("tokens", "class_words"):
        values = getattr(header, key)
        if len(values) > MAX_TOKENS:
            raise InvalidArgument(f"header.{key}", f"at most {MAX_TOKENS}, got {len(values)}")
    for i, token in enumerate(header.tokens):
        if not TOKEN.fullmatch(token):
            raise InvalidArgument(f"header.tokens[{i}]", f"1-64 characters without spaces, control characters or "
                                                         f"slashes, e.g. <new1>, got {quote(token)}")
    if len(set(header.tokens)) != len(header.tokens):
        raise InvalidArgument("header.tokens", "each token at most once")
    for i, word in enumerate(header.class_words):
        if not word.strip() or len(word) > MAX_TEXT or any(ord(ch) < 32 for ch in word):
            raise InvalidArgument(f"header.class_words[{i}]", f"1-{MAX_TEXT} characters without control "
                                                              f"characters, e.g. dog, got {quote(word)}")
    if header.tokens and header.class_words and len(header.class_words) != len(header.tokens):
        raise InvalidArgument("header.class_words", f"one per token: {len(header.tokens)} tokens, "
                                                    f"got {len(header.class_words)} class words")
    if len(header.request_id) > 128:
        raise InvalidArgument("header.request_id", f"at most 128 characters, got {len(header.request_id)}")
    return ImportHeader(header.concept_name, IMPORT_FORMATS[header.format], tuple(header.tokens),
                        tuple(header.class_words), header.request_id)


def check_ref(ref, field: str, weighted: bool = False):
    """Validate a ConceptRef message: a valid name, a version >= 0 (0 is the latest), and no `weight`
    unless the RPC reads one (`weighted`: Generate); a weight elsewhere would be silently ignored."""
    check_name(ref.name, f"{field}.name")
    if ref.version < 0:
        raise InvalidArgument(f"{field}.version", f"must be >= 0 (0 is the latest), got {ref.version}")
    if not weighted and ref.HasField("weight"):
        raise InvalidArgument(f"{field}.weight", "only Generate reads a concept weight; leave it unset here")
    return ref


def concept_service(registry: Registry, store: ArtifactStore, quotas: TenantQuotas,
                    base: Callable[[], BaseModel]) -> Service:
    """The ConceptService; `base` returns the deployment's base (imports and exports), loading it on first use."""
    servicer = ConceptServicer(registry, store, ConceptInterop(registry, store, quotas, base))
    return Service(concept_service_pb2_grpc.add_ConceptServiceServicer_to_server, servicer,
                   pb.DESCRIPTOR.services_by_name["ConceptService"].full_name)
