"""TrainerService: transport only. Validates and converts requests, calls `TrainingJobs`, converts back."""

from __future__ import annotations

import math
import re

from google.protobuf import json_format

from concepts.artifact import check_digest
from concepts.errors import CorruptArtifact, InvalidArgument, NotFound, quote
from concepts.store import ArtifactStore
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as pb
from customdiffusion.v1 import trainer_service_pb2_grpc
from services.common.convert import (PROTO_TO_STATE, STATE_TO_PROTO, check_name, concept_to_proto,
                                     next_page_token, page, timestamp)
from services.common.interceptors import current_tenant
from services.common.jobs import watch_job
from services.common.quotas import TenantQuotas
from services.common.registry import Registry
from services.common.server import Service
from services.common.settings import TrainerSettings
from services.trainer.images import check_image_header, check_image_size
from services.trainer.jobs import KIND, ImageBlob, TrainingJobs, TrainingRequest
from services.trainer.uploads import ImageUploads

TRAIN_MODES = {pb.TRAIN_MODE_CROSSATTN_KV: "crossattn_kv"}
PRECISIONS = {pb.MIXED_PRECISION_NO: "no", pb.MIXED_PRECISION_FP16: "fp16", pb.MIXED_PRECISION_BF16: "bf16"}
MAX_CONCEPTS = 8
MAX_NODES = 64
MAX_GPUS_PER_NODE = 16
MAX_TEXT = 1000
# New vocabulary words: "<" + letters, digits, "_" or "-" + ">" (docs/job-spec.md).
MODIFIER_TOKEN = re.compile(r"<[A-Za-z0-9_-]{1,32}>")
INITIALIZER_TOKEN = re.compile(r"[A-Za-z0-9_'-]{1,32}")


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    def __init__(self, settings: TrainerSettings, registry: Registry, store: ArtifactStore, jobs: TrainingJobs,
                 quotas: TenantQuotas) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.jobs = jobs
        self.quotas = quotas
        self.uploads = ImageUploads(settings, registry, store, quotas)

    def CreateTrainingJob(self, request: pb.CreateTrainingJobRequest, context) -> pb.CreateTrainingJobResponse:
        row, _ = self.jobs.create(current_tenant(), self._to_domain(request))
        return pb.CreateTrainingJobResponse(training_job=self._job(row))

    def GetTrainingJob(self, request: pb.GetTrainingJobRequest, context) -> pb.GetTrainingJobResponse:
        row = self.registry.get_job(_job_id(request.name), current_tenant(), KIND)
        return pb.GetTrainingJobResponse(training_job=self._job(row))

    def ListTrainingJobs(self, request: pb.ListTrainingJobsRequest, context) -> pb.ListTrainingJobsResponse:
        offset, limit = page(request.page_size, request.page_token)
        if request.state and request.state not in PROTO_TO_STATE:
            raise InvalidArgument("state", f"unknown job state {request.state}")
        rows = self.registry.list_jobs(current_tenant(), KIND, PROTO_TO_STATE.get(request.state, ""), offset, limit)
        return pb.ListTrainingJobsResponse(training_jobs=[self._job(r) for r in rows],
                                           next_page_token=next_page_token(offset, limit, len(rows)))

    def CancelTrainingJob(self, request: pb.CancelTrainingJobRequest, context) -> pb.CancelTrainingJobResponse:
        row = self.jobs.cancel(current_tenant(), _job_id(request.name))
        return pb.CancelTrainingJobResponse(training_job=self._job(row))

    def WatchTrainingJob(self, request: pb.WatchTrainingJobRequest, context):
        for row, line in watch_job(self.registry, _job_id(request.name), current_tenant(), KIND, context):
            yield pb.WatchTrainingJobResponse(training_job=self._job(row), log_line=line)

    def UploadImages(self, request_iterator, context) -> pb.UploadImagesResponse:
        chunks = ((message.data, message.end_of_image) for message in request_iterator)
        return pb.UploadImagesResponse(images=[
            pb.UploadedImage(uri=f"sha256:{image.digest}", size_bytes=image.size_bytes, width=image.header.width,
                             height=image.header.height, mime_type=image.header.mime_type)
            for image in self.uploads.upload(current_tenant(), chunks)])

    def _job(self, row) -> pb.TrainingJob:
        job = pb.TrainingJob(
            name=f"trainingJobs/{row.id}", state=STATE_TO_PROTO[row.state], concept_name=row.concept_name,
            concept_names=row.request.get("conceptNames", []), error_message=row.error_message,
            create_time=timestamp(row.created_at), update_time=timestamp(row.updated_at),
            request_id=row.request_id,
            progress=resources_pb2.Progress(
                step=int(row.progress.get("step", 0)), total_steps=int(row.progress.get("total_steps", 0)),
                loss=float(row.progress.get("loss", 0.0)), learning_rate=float(row.progress.get("lr", 0.0)),
                images_per_second=float(row.progress.get("images_per_s", 0.0)),
                eta_seconds=float(row.progress.get("eta_s", 0.0))),
        )
        json_format.ParseDict(row.request.get("hyperparameters", {}), job.hyperparameters)
        json_format.ParseDict(row.request.get("resources", {}), job.resources)
        if row.concept_id is not None:
            job.concept.CopyFrom(concept_to_proto(self.registry.get_concept_by_id(row.concept_id)))
        return job

    def _to_domain(self, request: pb.CreateTrainingJobRequest) -> TrainingRequest:
        """Check every field that needs no compute; the trainer's `check_inputs` checks the rest."""
        if not request.concepts:
            raise InvalidArgument("concepts", "give at least one concept to train")
        if len(request.concepts) > MAX_CONCEPTS:
            raise InvalidArgument("concepts", f"at most {MAX_CONCEPTS} concepts per job, got {len(request.concepts)}")
        names = [check_name(c.name, f"concepts[{i}].name") for i, c in enumerate(request.concepts)]
        concept_name = check_name(request.concept_name or "+".join(names), "concept_name")
        if len(request.request_id) > 128:
            raise InvalidArgument("request_id", f"at most 128 characters, got {len(request.request_id)}")
        tenant = current_tenant()
        resources = request.resources
        if not 0 <= resources.gpus_per_node <= MAX_GPUS_PER_NODE:
            raise InvalidArgument("resources.gpus_per_node",
                                  f"must be 0 (CPU) to {MAX_GPUS_PER_NODE}, got {resources.gpus_per_node}")
        nodes = resources.nodes or 1
        if not 1 <= nodes <= MAX_NODES:
            raise InvalidArgument("resources.nodes", f"must be 1 to {MAX_NODES}, got {resources.nodes}")
        if nodes > 1 and self.settings.launcher == "local":
            raise InvalidArgument("resources.nodes", "several nodes need the kubernetes launcher; "
                                                     "this server runs jobs locally")
        hyperparameters = self._hyperparameters(request.hyperparameters)
        concepts, images, class_images = [], [], []
        for i, c in enumerate(request.concepts):
            _check_texts(c, f"concepts[{i}]")
            if not c.class_prompt.strip():
                raise InvalidArgument(f"concepts[{i}].class_prompt", "must name the concept's class, e.g. 'dog'")
            if not c.images:
                raise InvalidArgument(f"concepts[{i}].images", "give at least one image of the concept")
            if len(c.images) > self.settings.max_images_per_concept:
                raise InvalidArgument(f"concepts[{i}].images", f"at most {self.settings.max_images_per_concept} "
                                                               f"images, got {len(c.images)}")
            if len(c.class_images) > self.settings.max_images_per_concept * 16:
                raise InvalidArgument(f"concepts[{i}].class_images", f"at most {self.settings.max_images_per_concept * 16}"
                                                                     f" class images, got {len(c.class_images)}")
        # Cheap checks of every field first; only then read blobs and image headers.
        self.quotas.check_job_size(tenant, max(resources.gpus_per_node, 0) * nodes)
        for i, c in enumerate(request.concepts):
            images.append([self._image(tenant, img, f"concepts[{i}].images[{j}]") for j, img in enumerate(c.images)])
            class_images.append([self._image(tenant, img, f"concepts[{i}].class_images[{j}]")
                                 for j, img in enumerate(c.class_images)])
            concept = {"name": c.name, "class_prompt": c.class_prompt}
            for key in ("instance_prompt", "modifier_token", "initializer_token", "num_class_images"):
                if getattr(c, key):
                    concept[key] = getattr(c, key)
            concepts.append(concept)
        spec = {"concepts": concepts, "concept_name": concept_name, "hyperparameters": hyperparameters}
        summary = json_format.MessageToDict(request)
        for c, blobs, class_blobs in zip(summary["concepts"], images, class_images):
            # keep digests, not megabytes of base64, in the registry
            c["images"] = [f"sha256:{b.digest}" for b in blobs]
            c["classImages"] = [f"sha256:{b.digest}" for b in class_blobs]
        summary["conceptNames"] = names
        return TrainingRequest(concept_name, request.request_id, spec, images, class_images,
                               resources.gpus_per_node, nodes, summary)

    def _image(self, tenant: str, image: pb.ImageInput, field: str) -> ImageBlob:
        which = image.WhichOneof("source")
        if which is None:
            raise InvalidArgument(field, "set either data (PNG/JPEG bytes) or uri (sha256:<digest> in the store)")
        if len(image.caption) > MAX_TEXT:
            raise InvalidArgument(f"{field}.caption", f"at most {MAX_TEXT} characters, got {len(image.caption)}")
        data = self._blob(tenant, image.uri, f"{field}.uri") if which == "uri" else image.data
        check_image_size(len(data), field, self.settings.max_image_bytes)
        check_image_header(data, field, self.settings.max_image_pixels)
        return ImageBlob(data, field, image.caption)

    def _blob(self, tenant: str, uri: str, field: str) -> bytes:
        """A blob the tenant owns; anyone else's, or none, is the same NOT_FOUND, and nothing of it is read."""
        if not uri.startswith("sha256:"):
            raise InvalidArgument(field, f"expected sha256:<64 hex characters>, got {quote(uri)}")
        digest = check_digest(uri, field)
        if not self.registry.owns_blob(tenant, digest):
            raise NotFound(f"{field}: no image sha256:{digest} among this tenant's uploads")
        try:
            return self.store.get_recorded(digest)
        except CorruptArtifact as e:
            raise CorruptArtifact(f"{field}: {e}") from e

    @staticmethod
    def _hyperparameters(h: pb.Hyperparameters) -> dict:
        """Only the fields the caller set (non-zero); the trainer fills in documented defaults."""
        for key in ("learning_rate", "prior_loss_weight"):
            if not math.isfinite(getattr(h, key)):
                raise InvalidArgument(f"hyperparameters.{key}", f"must be a finite number, got {getattr(h, key)}")
        out = {}
        for key in ("max_train_steps", "learning_rate", "effective_batch_size", "train_batch_size",
                    "gradient_accumulation_steps", "resolution", "seed", "checkpointing_steps"):
            if getattr(h, key):
                out[key] = getattr(h, key)
        if h.prior_loss_weight < 0:
            out["with_prior_preservation"] = False
        elif h.prior_loss_weight:
            out["prior_loss_weight"] = h.prior_loss_weight
        if h.train_mode:
            if h.train_mode not in TRAIN_MODES:
                raise InvalidArgument("hyperparameters.train_mode", f"unknown train mode {h.train_mode}; the one "
                                      "served is TRAIN_MODE_CROSSATTN_KV (docs/job-spec.md)")
            out["train_mode"] = TRAIN_MODES[h.train_mode]
        if h.mixed_precision:
            if h.mixed_precision not in PRECISIONS:
                raise InvalidArgument("hyperparameters.mixed_precision", f"unknown precision {h.mixed_precision}")
            out["mixed_precision"] = PRECISIONS[h.mixed_precision]
        if h.gradient_checkpointing:
            out["gradient_checkpointing"] = True
        if h.disable_augmentation:
            out["augment"] = False
        return out


def _check_texts(concept: pb.ConceptSpec, field: str) -> None:
    """Lengths, control characters and the token patterns of a concept's text fields."""
    for key in ("class_prompt", "instance_prompt", "modifier_token", "initializer_token"):
        value = getattr(concept, key)
        if len(value) > MAX_TEXT:
            raise InvalidArgument(f"{field}.{key}", f"at most {MAX_TEXT} characters, got {len(value)}")
        if any(ord(ch) < 32 for ch in value):
            raise InvalidArgument(f"{field}.{key}", f"must not contain control characters, got {quote(value)}")
    if concept.modifier_token and not MODIFIER_TOKEN.fullmatch(concept.modifier_token):
        raise InvalidArgument(f"{field}.modifier_token", f"must match <[A-Za-z0-9_-]{{1,32}}>, e.g. <new1>, "
                                                         f"got {quote(concept.modifier_token)}")
    if concept.initializer_token and not INITIALIZER_TOKEN.fullmatch(concept.initializer_token):
        raise InvalidArgument(f"{field}.initializer_token", f"must be one word of letters, digits, ' _ -, at most "
                                                            f"32 characters, got {quote(concept.initializer_token)}")


def _job_id(name: str) -> str:
    job_id = name.removeprefix("trainingJobs/")
    if not job_id or len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
        raise InvalidArgument("name", f"expected trainingJobs/<32 hex characters>, got {quote(name)}")
    return job_id


def trainer_service(settings: TrainerSettings, registry: Registry, store: ArtifactStore, jobs: TrainingJobs,
                    quotas: TenantQuotas) -> Service:
    return Service(trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server,
                   TrainerServicer(settings, registry, store, jobs, quotas),
                   pb.DESCRIPTOR.services_by_name["TrainerService"].full_name)
