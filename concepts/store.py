"""Content-addressed artifact store on a directory or any fsspec URL (``s3://bucket/prefix``)."""

from __future__ import annotations

import uuid

import fsspec

from concepts.artifact import Concept, check_digest, concept_from_bytes, concept_to_bytes, digest_of
from concepts.errors import CorruptArtifact, NotFound


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

    def uri(self, digest: str) -> str:
        """A URI for the blob that `get_uri` accepts back."""
        return f"sha256:{check_digest(digest)}"

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
        """The blob's bytes; raise `CorruptArtifact` naming the file and the expected digest on mismatch."""
        path = self.path(digest)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError as e:
            raise NotFound(f"no artifact with digest {digest} in store {self.url}") from e
        actual = digest_of(data)
        if actual != check_digest(digest):
            raise CorruptArtifact(
                f"{path}: content does not match its address: expected sha256 {check_digest(digest)}, "
                f"got {actual} ({len(data)} bytes); the file is truncated or was modified"
            )
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
        return concept_from_bytes(self.get(digest), source=self.path(digest))

    def get_uri(self, uri: str) -> bytes:
        """Bytes of a ``sha256:<hex>`` URI of this store."""
        if not uri.startswith("sha256:"):
            raise NotFound(f"{uri!r} is not a URI of this store; expected sha256:<64 hex>")
        return self.get(uri.removeprefix("sha256:"))
