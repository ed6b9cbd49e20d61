"""UploadImages behind the TrainerService: training images received in chunks, checked, then stored.

Each image is checked as CreateTrainingJob checks an inline one (`images.py`: its size as it arrives,
then format and pixel count from its header, before any decoding), and the call's image count and the
tenant's `stored_bytes` quota are checked as the images arrive, so the first image that fails ends the
call without the rest being received. Nothing is written to the store or the registry until every image
of the call has passed.

Memory: images are spooled, up to SPOOL_BYTES in memory and beyond that in an unlinked temporary file
($TMPDIR), so a call holds one image at a time in memory (to read its header, then to store it),
however many it sends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from tempfile import SpooledTemporaryFile

from concepts.errors import InvalidArgument
from concepts.store import ArtifactStore
from services.common.quotas import TenantQuotas
from services.common.registry import Registry
from services.common.settings import TrainerSettings
from services.trainer.images import ImageHeader, check_image_header, check_image_size

SPOOL_BYTES = 1024 * 1024


@dataclass(frozen=True)
class UploadedImage:
    """One stored image: its sha256 (hex), size and header."""

    digest: str
    size_bytes: int
    header: ImageHeader


class ImageUploads:
    def __init__(self, settings: TrainerSettings, registry: Registry, store: ArtifactStore,
                 quotas: TenantQuotas) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.quotas = quotas

    def upload(self, tenant: str, chunks: Iterable[tuple[bytes, bool]]) -> list[UploadedImage]:
        """Receive images as `(data, end_of_image)` chunks, check each, then store them all for `tenant`.

        Returns:
            One entry per image, in the order received; the same bytes twice give the same digest.

        Raises:
            InvalidArgument: no image ("images"), more than `max_images_per_concept` ("images"), or an
                image ("images[i]") over `max_image_bytes`, not a PNG or JPEG within `max_image_pixels`,
                or cut off by the end of the stream.
            QuotaExceeded: the images new to the tenant exceed its `stored_bytes`.
        """
        with ExitStack() as spools:
            received = self._receive(tenant, chunks, spools)
            return self._store(tenant, received)

    def _receive(self, tenant: str, chunks: Iterable[tuple[bytes, bool]], spools: ExitStack
                 ) -> list[tuple[UploadedImage, SpooledTemporaryFile]]:
        """Every image of the stream, checked one by one as it completes; nothing is written."""
        limit = self.settings.max_images_per_concept
        received: list[tuple[UploadedImage, SpooledTemporaryFile]] = []
        new_digests: set[str] = set()
        new_bytes = 0
        spool, size, sha = None, 0, hashlib.sha256()
        for data, end_of_image in chunks:
            field = f"images[{len(received)}]"
            if spool is None:  # this chunk starts an image
                if len(received) == limit:
                    raise InvalidArgument("images", f"at most {limit} images per call; send the rest in another")
                spool, size, sha = spools.enter_context(SpooledTemporaryFile(SPOOL_BYTES)), 0, hashlib.sha256()
            size += len(data)
            check_image_size(size, field, self.settings.max_image_bytes, partial=not end_of_image)
            spool.write(data)
            sha.update(data)
            if not end_of_image:
                continue
            spool.seek(0)
            header = check_image_header(spool.read(), field, self.settings.max_image_pixels)
            image = UploadedImage(sha.hexdigest(), size, header)
            # The quota counts what the tenant does not own yet, each distinct image once.
            if image.digest not in new_digests and not self.registry.owns_blob(tenant, image.digest):
                new_digests.add(image.digest)
                new_bytes += size
                self.quotas.check_storage(tenant, new_bytes)
            received.append((image, spool))
            spool = None
        if spool is not None:
            raise InvalidArgument(f"images[{len(received)}]", "the stream ended inside this image: set "
                                                              "end_of_image on the last chunk of every image")
        if not received:
            raise InvalidArgument("images", "send at least one image: its bytes in chunks, the last with end_of_image")
        return received

    def _store(self, tenant: str, received: list[tuple[UploadedImage, SpooledTemporaryFile]]) -> list[UploadedImage]:
        """Store every image, then record the tenant's ownership; a failure removes the blobs this call added."""
        added: list[str] = []
        try:
            for image, spool in received:
                if self.store.exists(image.digest):  # stored before (by anyone) or earlier in this call
                    continue
                spool.seek(0)
                self.store.put(spool.read())
                added.append(image.digest)
            self.registry.own_blobs(tenant, {image.digest: image.size_bytes for image, _ in received})
        except BaseException:
            # Keep what someone has come to own meanwhile (a concurrent upload of the same bytes).
            for digest in added:
                if not self.registry.references_blob(digest):
                    self.store.delete(digest)
            raise
        return [image for image, _ in received]
