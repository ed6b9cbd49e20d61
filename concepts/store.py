"""Content-addressed artifact store on a directory or any fsspec URL (``s3://bucket/prefix``)."""

from __future__ import annotations

import logging
import uuid

import fsspec

from concepts.artifact import Concept, check_digest, concept_from_bytes, concept_to_bytes, digest_of
from concepts.errors import CorruptArtifact, NotFound

log = logging.getLogger(__name__)


class ArtifactStore:
    """Blobs addressed by the sha256 of their bytes: written to a temporary name then renamed, verified on read.

    Thread-safe: every write goes to its own temporary name, and a rename to the final name is
    idempotent because equal names mean equal bytes.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(f"{self.root}/sha256", exist_ok=True)
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)

    def path(self, digest: str) -> str:
        """Where the blob with this digest lives (inside the store's filesystem)."""
        return f"{self.root}/sha256/{check_digest(digest)}"

    def put(self, data: bytes) -> str:
        """Store bytes and return their digest; storing the same bytes twice is a no-op."""
        digest = digest_of(data)
        final = self.path(digest)
        if self.fs.exists(final):
            return digest
        tmp = f"{self.root}/tmp/{digest}.{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes; `CorruptArtifact` when they do not match the digest.

        Messages name the digest only: they may reach callers, so the store's paths go to the log.
        """
        path = self.path(digest)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError as e:
            raise NotFound(f"no blob sha256:{digest} in the artifact store") from e
        actual = digest_of(data)
        if actual != check_digest(digest):
            log.error("%s: content does not match its address (sha256 %s, %d bytes)", path, actual, len(data))
            raise CorruptArtifact(f"blob sha256:{digest} in the artifact store does not match its address: "
                                  "it is truncated or was modified")
        return data

    def exists(self, digest: str) -> bool:
        return self.fs.exists(self.path(digest))

    def delete(self, digest: str) -> None:
        """Remove a blob; a missing blob is not an error."""
        path = self.path(digest)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def put_concept(self, concept: Concept) -> str:
        return self.put(concept_to_bytes(concept))

    def get_concept(self, digest: str) -> Concept:
        return concept_from_bytes(self.get(digest), source=f"sha256:{digest}")

    def get_recorded(self, digest: str) -> bytes:
        """Bytes of a blob the registry records (a concept's artifact, a tenant's upload): a missing one is
        data loss (`CorruptArtifact`, DATA_LOSS to callers), not NOT_FOUND."""
        try:
            return self.get(digest)
        except NotFound as e:
            raise self._lost(digest) from e

    def check_recorded(self, digest: str) -> None:
        """`CorruptArtifact` when a blob the registry records is missing, without reading it."""
        if not self.exists(digest):
            raise self._lost(digest)

    def get_registered_concept(self, digest: str) -> Concept:
        """A concept the registry lists (`get_recorded`), parsed."""
        return concept_from_bytes(self.get_recorded(digest), source=f"sha256:{digest}")

    def _lost(self, digest: str) -> CorruptArtifact:
        log.error("blob %s that the registry records is missing from the store %s", digest, self.url)
        return CorruptArtifact(f"blob sha256:{digest} is missing from the store; restore it from a backup "
                               "or delete what names it")
