"""ImportConcept and ExportConcept behind the ConceptService: Custom Diffusion checkpoints to and from the
tenant's registered concepts, through `concepts.interop` (what `customdiff import` and `customdiff export`
run) against the deployment's base.

Files travel through a private temporary directory ($TMPDIR), because `concepts.interop` reads and
writes files by path; it is removed when the call ends, and its path never reaches a caller.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from concepts.artifact import concept_to_bytes, digest_of
from concepts.base import BaseModel, load_base
from concepts.errors import CorruptArtifact, InvalidArgument, quote
from concepts.interop import WEIGHTS_NAME, WEIGHTS_NAME_BIN, export_diffusers, import_concept
from concepts.store import ArtifactStore
from services.common.models import ConceptRow
from services.common.quotas import TenantQuotas
from services.common.registry import Registry

log = logging.getLogger(__name__)
# An SD-2.x checkpoint with every cross-attention projection trained is about 200 MB, an SDXL one with
# its K/V trained (Custom Diffusion's default) 1.37 GB (340M float32 weights); files are parsed in
# memory (about three times their size at the peak), so this also bounds an import's memory.
MAX_IMPORT_BYTES = 1536 * 1024**2
MAX_IMPORT_FILES = 64
# Below any sane max_message_bytes (the server's send limit), with room for the file name.
EXPORT_CHUNK_BYTES = 512 * 1024
# A token becomes a file name on export (<token>.safetensors) and is found in prompts by its text.
TOKEN = re.compile(r"[^\s/\\\x00-\x1f\x7f]{1,64}")
_FILE_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]+")
_DIFFUSERS_SUFFIXES = (".safetensors", ".bin")
_TORCH_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", re.S)


@dataclass(frozen=True)
class ImportHeader:
    """A validated ImportConcept header; `format` None: from the file names, as `customdiff import` does."""

    concept_name: str
    format: str | None
    tokens: tuple[str, ...] = ()
    class_words: tuple[str, ...] = ()
    request_id: str = ""


class LazyBase:
    """The deployment's base, loaded on first use and kept; servers that never import or export never load it.

    Thread-safe: concurrent first calls load it once. The modules are only read afterwards.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._base: BaseModel | None = None
        self._lock = threading.Lock()

    def __call__(self) -> BaseModel:
        with self._lock:
            if self._base is None:
                log.info("loading the base model %s for concept imports and exports", self.path)
                self._base = load_base(self.path)
            return self._base


class ConceptInterop:
    def __init__(self, registry: Registry, store: ArtifactStore, quotas: TenantQuotas,
                 base: Callable[[], BaseModel]) -> None:
        self.registry = registry
        self.store = store
        self.quotas = quotas
        self.base = base

    def import_files(self, tenant: str, header: ImportHeader, chunks: Iterable[tuple[str, bytes]]) -> ConceptRow:
        """Register the checkpoint sent as `(file_name, data)` chunks as the next version of the concept.

        A file starts at a chunk with a file name; chunks without one continue it.

        Raises:
            InvalidArgument: bad framing or file names, over the limits, or files that do not parse or
                do not fit the base (the field names the header field, "file_name" or "data").
            QuotaExceeded: the artifact would exceed the tenant's `stored_bytes`.
        """
        # 1. A retry of an earlier import returns what it registered, reading nothing.
        if header.request_id:
            earlier = self.registry.concept_by_request_id(tenant, header.concept_name, header.request_id)
            if earlier is not None:
                return earlier
        # 2. The files, within the limits as they arrive; then deltas against the base (interop's checks).
        with tempfile.TemporaryDirectory(prefix="customdiff-import-") as tmp:
            directory = Path(tmp)
            names = receive_files(chunks, directory)
            path, fmt = _checkpoint_path(directory, names, header.format)
            concept = self._import(path, fmt, header, directory)
        # 3. Quota, then the artifact, then its registry row; a failure leaves neither.
        data = concept_to_bytes(concept)
        digest = digest_of(data)
        self.quotas.check_storage(tenant, 0 if self.registry.owns_blob(tenant, digest) else len(data))
        existed = self.store.exists(digest)
        self.store.put(data)
        provenance = dict(concept.provenance, **({"request_id": header.request_id} if header.request_id else {}))
        try:
            return self.registry.add_concept(tenant, header.concept_name, digest, list(concept.tokens),
                                             list(concept.class_words), len(data), concept.base_fingerprint,
                                             provenance)
        except BaseException:
            if not existed and not self.registry.references_blob(digest):
                self.store.delete(digest)
            raise

    def _import(self, path: Path, fmt: str, header: ImportHeader, directory: Path):
        base = self.base()
        try:
            concept = import_concept(path, base, fmt, list(header.tokens) or None, list(header.class_words) or None)
        except (InvalidArgument, CorruptArtifact) as e:
            raise _caller_error(e, directory, header, fmt) from None
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
            # Anything else interop's readers trip over is a layout they do not expect, in the caller's files.
            log.info("import of a %s checkpoint failed", fmt, exc_info=True)
            kind = "a diffusers" if fmt == "diffusers" else "an original"
            raise InvalidArgument("data", f"the files do not have the layout of {kind} Custom Diffusion "
                                          f"checkpoint (docs/artifact-format.md, 'Import')") from None
        bad = [t for t in concept.tokens if not TOKEN.fullmatch(t)]
        if bad:  # named by the token files' names, or inside the file
            raise InvalidArgument("file_name" if fmt == "diffusers" else "data",
                                  f"token {quote(bad[0])}: tokens are 1-64 characters without spaces, control "
                                  f"characters or slashes")
        return concept

    def export_files(self, tenant: str, name: str, version: int) -> Iterator[tuple[str, bytes]]:
        """The tenant's concept as diffusers files: `(file_name, data)` chunks, the file name on each file's first.

        Every check runs before this returns; the iterator only reads the files written.

        Raises:
            NotFound: no such concept of this tenant (another tenant's too).
            BaseMismatch: the concept was made for another base than the deployment's.
            CorruptArtifact: its artifact is missing from the store or damaged.
        """
        row = self.registry.get_concept(tenant, name, version)
        concept = self.store.get_registered_concept(row.digest)
        tmp = tempfile.TemporaryDirectory(prefix="customdiff-export-")
        try:
            files = export_diffusers(concept, self.base(), tmp.name)
        except BaseException:
            tmp.cleanup()
            raise
        return _file_chunks(files, tmp)


def receive_files(chunks: Iterable[tuple[str, bytes]], directory: Path) -> list[str]:
    """Write the streamed files into `directory`; return their names in the order sent.

    Raises:
        InvalidArgument: data before any file name, a file name that is not a plain name or comes twice,
            more than MAX_IMPORT_FILES files or MAX_IMPORT_BYTES bytes, or no file at all.
    """
    names: list[str] = []
    total = 0
    current = None
    try:
        for name, data in chunks:
            if name:
                if len(names) == MAX_IMPORT_FILES:
                    raise InvalidArgument("file_name", f"at most {MAX_IMPORT_FILES} files per checkpoint")
                if not _FILE_NAME.fullmatch(name) or name in (".", "..") or len(name.encode()) > 255:
                    raise InvalidArgument("file_name", f"must be a plain file name (no directories, at most 255 "
                                                       f"bytes), got {quote(name)}")
                if name in names:
                    raise InvalidArgument("file_name", f"{quote(name)} was sent twice")
                if current is not None:
                    current.close()
                current = open(directory / name, "xb")  # noqa: SIM115 - closed on the next file or below
                names.append(name)
            elif current is None:
                if not data:
                    continue  # the header's message carries no file
                raise InvalidArgument("file_name", "set file_name on the first chunk of each file; data came "
                                                   "before any file name")
            total += len(data)
            if total > MAX_IMPORT_BYTES:
                raise InvalidArgument("data", f"the checkpoint's files exceed {MAX_IMPORT_BYTES} bytes in all")
            current.write(data)
    finally:
        if current is not None:
            current.close()
    if not names:
        raise InvalidArgument("file_name", "send the checkpoint's files after the header")
    return names


def _checkpoint_path(directory: Path, names: list[str], fmt: str | None) -> tuple[Path, str]:
    """What `import_concept` reads, and the format: the files must be exactly what that format reads."""
    weights = [n for n in names if n in (WEIGHTS_NAME, WEIGHTS_NAME_BIN)]
    if fmt is None:
        fmt = "diffusers" if weights else "original"
    if fmt == "original":
        if len(names) != 1:
            raise InvalidArgument("file_name", f"an original checkpoint is one delta.bin or .ckpt file, got "
                                               f"{len(names)} files")
        return directory / names[0], fmt
    if len(weights) != 1:
        raise InvalidArgument("file_name", f"a diffusers checkpoint has one {WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN}), "
                                           f"got {len(weights)}")
    stray = [n for n in names if not n.endswith(_DIFFUSERS_SUFFIXES)]
    if stray:
        raise InvalidArgument("file_name", f"a diffusers checkpoint holds only .safetensors and .bin files, got "
                                           f"{quote(stray[0])}")
    return directory, fmt


def _caller_error(e: InvalidArgument | CorruptArtifact, directory: Path, header: ImportHeader,
                  fmt: str) -> InvalidArgument:
    """Interop's error about the caller's files, with the request's field and without the server's paths."""
    text = e.description if isinstance(e, InvalidArgument) else str(e)
    text = text.replace(f"{directory}/", "").replace(str(directory), "the upload")
    if "Weights only load failed" in text:  # torch's text advises weights_only=False: give its reason only
        reason = _TORCH_REASON.search(text)
        text = text[:text.index("Weights only load failed")] + (
            reason.group(1) if reason else "not loadable with torch.load(weights_only=True)")
    field = e.field if isinstance(e, InvalidArgument) else "data"
    if field == "tokens":  # named by the header, else by the token files' names or inside the file
        field = "header.tokens" if header.tokens else "file_name" if fmt == "diffusers" else "data"
    else:
        field = {"class_words": "header.class_words", "format": "header.format"}.get(field, "data")
    return InvalidArgument(field, text)


def _file_chunks(files: list[Path], tmp: tempfile.TemporaryDirectory) -> Iterator[tuple[str, bytes]]:
    """Each file in chunks of at most EXPORT_CHUNK_BYTES, its name on its first; removes `tmp` when done."""
    try:
        for file in files:
            with open(file, "rb") as f:
                data = f.read(EXPORT_CHUNK_BYTES)
                yield file.name, data
                while len(data) == EXPORT_CHUNK_BYTES:
                    data = f.read(EXPORT_CHUNK_BYTES)
                    if data:
                        yield "", data
    finally:
        tmp.cleanup()
