"""Job leases: which replica of a service runs which job, and how a live replica takes over a dead one's.

Every job row names its owner (a replica id, by default the host name: the pod's name) and until when
the owner's lease holds. A replica leases the jobs it creates and renews its leases every `lease_s / 3`
seconds. On every round it also claims the jobs whose lease expired (their replica died or lost the
database) and adopts them as it would after a restart. When it starts it claims its own jobs from
before the restart and jobs never leased. When it stops cleanly it ends its leases, so that the others
adopt at once. The replicas' clocks must agree to well within `lease_s` (NTP does).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from services.common.models import JobRow
from services.common.registry import Registry

log = logging.getLogger(__name__)


def replica_id(configured: str = "") -> str:
    """This replica's name in job leases: the configured one, else the host name (a pod's own name)."""
    return configured or socket.gethostname()


class JobLeases:
    """This replica's leases on jobs of `kinds`: `adopt` is called (on the lease thread) for each job it
    claims; `lost` with the id of each job it held that ended or that another replica took over."""

    def __init__(self, registry: Registry, kinds: tuple[str, ...], owner: str, lease_s: float,
                 adopt: Callable[[JobRow], None], lost: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.kinds = kinds
        self.owner = owner
        self.lease_s = lease_s
        self._adopt = adopt
        self._lost = lost
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"leases-{kinds[0]}")

    def start(self) -> "JobLeases":
        """Adopt this replica's jobs from before a restart, and unleased ones, then keep leases in a thread."""
        self._claim(starting=True)
        self._thread.start()
        return self

    def owns(self, row: JobRow) -> bool:
        return row.owner == self.owner

    def close(self) -> None:
        """Stop renewing and end this replica's leases: the other replicas take its jobs over now."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.registry.release_leases(self.kinds, self.owner)
        except Exception:  # noqa: BLE001 - the leases then expire on their own
            log.exception("could not end this replica's job leases; they expire in %.0f s", self.lease_s)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                held = self.registry.renew_leases(self.kinds, self.owner, self.lease_s)
                for job_id in self._held - held:
                    if self._lost is not None:
                        self._lost(job_id)
                self._held = held
                self._claim(starting=False)
            except Exception:  # noqa: BLE001 - e.g. the database is down: try again next round
                log.exception("renewing and claiming job leases failed; retrying in %.1f s", self.lease_s / 3)

    def _claim(self, starting: bool) -> None:
        for row in self.registry.claim_jobs(self.kinds, self.owner, self.lease_s, starting=starting):
            log.info("replica %s adopts %s job %s", self.owner, row.kind, row.id)
            try:
                self._adopt(row)
            except Exception:  # noqa: BLE001 - one job's trouble must not stop adopting the others
                log.exception("adopting job %s failed; it is claimed again next round", row.id)
                self.registry.release_leases(self.kinds, self.owner, job_id=row.id)
                continue
            self._held.add(row.id)
