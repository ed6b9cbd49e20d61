"""Per-tenant quotas (settings `quotas`): checked before anything is written, so a refused request leaves nothing.

Counts of jobs and stored bytes come from the registry, so they hold across replicas (two requests
racing on different replicas may both pass the last free slot). Concurrent generations are counted
per inference replica.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from concepts.errors import QuotaExceeded
from services.common.metrics import QUOTA_REJECTIONS
from services.common.registry import Registry
from services.common.settings import Quotas


class TenantQuotas:
    def __init__(self, quotas: Quotas, registry: Registry) -> None:
        self.quotas = quotas
        self.registry = registry
        self._generations: Counter[str] = Counter()
        self._lock = threading.Lock()

    def check_job_size(self, tenant: str, gpus: int) -> None:
        """`gpus_per_job`: GPUs per node x nodes of one training job."""
        limit = self.quotas.for_tenant(tenant).gpus_per_job
        if limit and gpus > limit:
            raise _refused("gpus_per_job", tenant, f"the job asks for {gpus} GPUs (gpus_per_node x nodes); "
                                                   f"the limit is {limit}")

    def check_training_jobs(self, tenant: str) -> None:
        """`training_jobs`: queued plus running training jobs, one more to come."""
        limit = self.quotas.for_tenant(tenant).training_jobs
        if limit:
            active = self.registry.count_unfinished_jobs(tenant, ("training",))
            if active >= limit:
                raise _refused("training_jobs", tenant, f"{active} training jobs are queued or running; "
                                                        f"the limit is {limit}: wait for one to end or cancel one")

    def check_storage(self, tenant: str, new_bytes: int) -> None:
        """`stored_bytes`: what the tenant owns in the store plus `new_bytes` about to be written."""
        limit = self.quotas.for_tenant(tenant).stored_bytes
        if limit:
            used = self.registry.stored_bytes(tenant)
            if used + new_bytes > limit:
                raise _refused("stored_bytes", tenant, f"{used} bytes stored plus {new_bytes} new exceed the "
                                                       f"limit of {limit} bytes: delete concepts to make room")

    @contextmanager
    def generation(self, tenant: str) -> Iterator[None]:
        """Hold one of the tenant's `concurrent_generations` slots on this replica for the block."""
        limit = self.quotas.for_tenant(tenant).concurrent_generations
        with self._lock:
            if limit and self._generations[tenant] >= limit:
                raise _refused("concurrent_generations", tenant,
                               f"{limit} generations of this tenant are already running on this replica")
            self._generations[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._generations[tenant] -= 1
                if not self._generations[tenant]:
                    del self._generations[tenant]


def _refused(quota: str, tenant: str, description: str) -> QuotaExceeded:
    """The error for a refusal by `quota`, counted in `customdiff_quota_rejections_total`."""
    QUOTA_REJECTIONS.labels(quota).inc()
    return QuotaExceeded(quota, tenant, description)
