"""The registry: tenants' concepts and jobs in SQL (SQLite file by default, any SQLAlchemy URL in a cluster).

Thread-safe: every method opens its own session. Watchers wait on an in-process condition and also
poll, so events written by another replica are seen too.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, func, or_, select, text, union, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from concepts.errors import NotFound
from services.common.metrics import JOB_SECONDS
from services.common.models import BlobOwnerRow, ConceptRow, JobEventRow, JobRow, utcnow

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
MIGRATIONS = Path(__file__).parent / "migrations"
# PostgreSQL advisory lock held while migrating: replicas that start together migrate one after another.
MIGRATION_LOCK = 0x637573746F6D64  # "customd"


@dataclass(frozen=True)
class MetricCounts:
    """What the registry's gauges show, by label values: jobs by (kind, state); concepts and stored
    bytes by (tenant,)."""

    jobs: dict[tuple[str, str], int]
    concepts: dict[tuple[str], int]
    stored_bytes: dict[tuple[str], int]


class Registry:
    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}
                                    if url.startswith("sqlite") else {})
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._changed = threading.Condition()
        self.watchers_released = False

    def migrate(self) -> None:
        """Bring the schema to the newest alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":  # (SQLite: one replica only)
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def _session(self) -> Session:
        return self._sessions()

    # Concepts ------------------------------------------------------------------------------------

    def add_concept(self, tenant: str, name: str, digest: str, tokens: list[str], class_words: list[str],
                    size_bytes: int, base_fingerprint: str, provenance: dict[str, Any]) -> ConceptRow:
        """Register the next version of `name` for `tenant`."""
        for _ in range(5):  # concurrent registrations of one name race for the version number
            with self._session() as s:
                row = _insert_concept(s, tenant, name, dict(
                    digest=digest, tokens=tokens, class_words=class_words, size_bytes=size_bytes,
                    base_fingerprint=base_fingerprint, provenance=provenance))
                try:
                    s.commit()
                    return row
                except IntegrityError:
                    s.rollback()
        raise RuntimeError(f"could not register a new version of concept {name!r}")

    def complete_job(self, job_id: str, concept: dict[str, Any], log_line: str = "") -> ConceptRow | None:
        """Register the job's result as the next version of its concept and mark it succeeded, atomically.

        Returns None, registering nothing, when the job already ended: a result reported twice (a
        relaunched watcher, a second replica) is registered once.
        """
        for _ in range(5):  # two jobs of one concept that end together race for the version number
            with self._session() as s:
                job = s.get(JobRow, job_id, with_for_update=True)  # a concurrent completion waits here
                if job is None or job.state in TERMINAL_STATES:
                    return None
                row = _insert_concept(s, job.tenant, job.concept_name, concept)
                try:
                    s.flush()
                    job.state, job.concept_id, job.updated_at = "succeeded", row.id, utcnow()
                    s.add(JobEventRow(job_id=job_id, state="succeeded",
                                      log_line=log_line or f"registered {job.concept_name} v{row.version}"))
                    s.commit()
                except IntegrityError:
                    s.rollback()
                    continue
            _observe_end(job)
            self._notify()
            return row
        raise RuntimeError(f"could not register the result of job {job_id!r}")

    def get_concept(self, tenant: str, name: str, version: int = 0) -> ConceptRow:
        """The version (0: latest) of the tenant's concept; another tenant's concept is NotFound too."""
        with self._session() as s:
            query = select(ConceptRow).where(ConceptRow.tenant == tenant, ConceptRow.name == name)
            query = query.where(ConceptRow.version == version) if version else query.order_by(ConceptRow.version.desc())
            row = s.scalars(query.limit(1)).first()
        if row is None:
            what = f"concept {name!r}" + (f" version {version}" if version else "")
            raise NotFound(f"{what} not found")
        return row

    def get_concept_by_id(self, concept_id: int) -> ConceptRow:
        with self._session() as s:
            row = s.get(ConceptRow, concept_id)
        if row is None:
            raise NotFound(f"concept #{concept_id} not found")
        return row

    def concept_by_request_id(self, tenant: str, name: str, request_id: str) -> ConceptRow | None:
        """The version of the tenant's concept `name` registered with this `provenance.request_id` (an import's
        idempotency key), if any. A name has few versions: they are filtered here, not in SQL's JSON dialects."""
        with self._session() as s:
            rows = s.scalars(select(ConceptRow).where(ConceptRow.tenant == tenant, ConceptRow.name == name)
                             .order_by(ConceptRow.version))
            return next((r for r in rows if (r.provenance or {}).get("request_id") == request_id), None)

    def list_concepts(self, tenant: str, name: str = "", offset: int = 0, limit: int = 50) -> list[ConceptRow]:
        with self._session() as s:
            query = select(ConceptRow).where(ConceptRow.tenant == tenant)
            if name:
                query = query.where(ConceptRow.name == name)
            query = query.order_by(ConceptRow.name, ConceptRow.version).offset(offset).limit(limit)
            return list(s.scalars(query))

    def delete_concepts(self, tenant: str, name: str, version: int = 0) -> tuple[list[ConceptRow], list[str]]:
        """Delete one version (or all, version 0); return the rows and the digests nothing references any more."""
        with self._session() as s:
            query = select(ConceptRow).where(ConceptRow.tenant == tenant, ConceptRow.name == name)
            if version:
                query = query.where(ConceptRow.version == version)
            rows = list(s.scalars(query))
            if not rows:
                raise NotFound(f"concept {name!r}" + (f" version {version}" if version else "") + " not found")
            for row in rows:
                s.delete(row)
            s.flush()
            digests = {r.digest for r in rows}
            still_used = set(s.scalars(select(ConceptRow.digest).where(ConceptRow.digest.in_(digests))))
            still_used |= set(s.scalars(select(BlobOwnerRow.digest).where(BlobOwnerRow.digest.in_(digests))))
            s.commit()
        return rows, sorted(digests - still_used)

    # Blob ownership ------------------------------------------------------------------------------

    def own_blobs(self, tenant: str, blobs: dict[str, int]) -> None:
        """Record that `tenant` owns these blobs (digest -> size in bytes); owning one twice is a no-op."""
        for digest, size in blobs.items():
            with self._session() as s:
                if s.get(BlobOwnerRow, (tenant, digest)) is not None:
                    continue
                s.add(BlobOwnerRow(tenant=tenant, digest=digest, size_bytes=size))
                try:
                    s.commit()
                except IntegrityError:  # a concurrent request of the same tenant recorded it first
                    s.rollback()

    def owns_blob(self, tenant: str, digest: str) -> bool:
        """Whether `tenant` sent this blob or has a concept whose artifact it is."""
        with self._session() as s:
            if s.get(BlobOwnerRow, (tenant, digest)) is not None:
                return True
            return s.scalar(select(ConceptRow.id).where(ConceptRow.tenant == tenant, ConceptRow.digest == digest)
                            .limit(1)) is not None

    def references_blob(self, digest: str) -> bool:
        """Whether any tenant owns this blob or has a concept whose artifact it is: it must stay in the store."""
        with self._session() as s:
            if s.scalar(select(BlobOwnerRow.tenant).where(BlobOwnerRow.digest == digest).limit(1)) is not None:
                return True
            return s.scalar(select(ConceptRow.id).where(ConceptRow.digest == digest).limit(1)) is not None

    def stored_bytes(self, tenant: str) -> int:
        """Bytes of every distinct blob the tenant owns: training images and concept artifacts."""
        owned = union(select(BlobOwnerRow.digest, BlobOwnerRow.size_bytes).where(BlobOwnerRow.tenant == tenant),
                      select(ConceptRow.digest, ConceptRow.size_bytes).where(ConceptRow.tenant == tenant)).subquery()
        with self._session() as s:
            return int(s.scalar(select(func.coalesce(func.sum(owned.c.size_bytes), 0))) or 0)

    def metric_counts(self) -> MetricCounts:
        """Jobs by kind and state, and per tenant its concept versions and stored bytes (one query each)."""
        owned = union(select(BlobOwnerRow.tenant, BlobOwnerRow.digest, BlobOwnerRow.size_bytes),
                      select(ConceptRow.tenant, ConceptRow.digest, ConceptRow.size_bytes)).subquery()
        with self._session() as s:
            jobs = s.execute(select(JobRow.kind, JobRow.state, func.count()).group_by(JobRow.kind, JobRow.state))
            concepts = s.execute(select(ConceptRow.tenant, func.count()).group_by(ConceptRow.tenant))
            stored = s.execute(select(owned.c.tenant, func.sum(owned.c.size_bytes)).group_by(owned.c.tenant))
            return MetricCounts({(k, st): n for k, st, n in jobs}, {(t,): n for t, n in concepts},
                                {(t,): int(n or 0) for t, n in stored})

    # Jobs ----------------------------------------------------------------------------------------

    def create_job(self, tenant: str, kind: str, request_id: str, concept_name: str, request: dict[str, Any],
                   job_id: str | None = None, work_dir: str = "", owner: str | None = None,
                   lease_s: float = 0.0) -> tuple[JobRow, bool]:
        """Record a queued job, leased to `owner` for `lease_s` seconds; with a known `request_id` return the
        first job instead (created=False)."""
        if request_id:
            existing = self.job_by_request_id(tenant, kind, request_id)
            if existing is not None:
                return existing, False
        row = JobRow(id=job_id or uuid.uuid4().hex, tenant=tenant, kind=kind, state="queued",
                     request_id=request_id, concept_name=concept_name, request=request, progress={}, report={},
                     error_message="", work_dir=work_dir, owner=owner,
                     lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s) if owner else None)
        with self._session() as s:
            try:
                s.add(row)
                s.flush()  # the job row first: job_events references it
                s.add(JobEventRow(job_id=row.id, state="queued", log_line=""))
                s.commit()
            except IntegrityError:  # a concurrent create with the same request_id won
                s.rollback()
                return self.job_by_request_id(tenant, kind, request_id), False
        self._notify()
        return row, True

    def job_by_request_id(self, tenant: str, kind: str, request_id: str) -> JobRow | None:
        with self._session() as s:
            return s.scalars(select(JobRow).where(JobRow.tenant == tenant, JobRow.kind == kind,
                                                  JobRow.request_id == request_id)).first()

    def get_job(self, job_id: str, tenant: str | None = None, kind: str | None = None) -> JobRow:
        """The job; NotFound when it does not exist, belongs to another tenant or is of another kind."""
        with self._session() as s:
            row = s.get(JobRow, job_id)
        if row is None or (tenant is not None and row.tenant != tenant) or (kind is not None and row.kind != kind):
            raise NotFound(f"job {job_id!r} not found")
        return row

    def list_jobs(self, tenant: str, kind: str, state: str = "", offset: int = 0, limit: int = 50) -> list[JobRow]:
        with self._session() as s:
            query = select(JobRow).where(JobRow.tenant == tenant, JobRow.kind == kind)
            if state:
                query = query.where(JobRow.state == state)
            return list(s.scalars(query.order_by(JobRow.created_at, JobRow.id).offset(offset).limit(limit)))

    def count_unfinished_jobs(self, tenant: str, kinds: tuple[str, ...]) -> int:
        """The tenant's queued and running jobs of these kinds."""
        with self._session() as s:
            return s.scalar(select(func.count()).select_from(JobRow).where(
                JobRow.tenant == tenant, JobRow.kind.in_(kinds), JobRow.state.not_in(TERMINAL_STATES))) or 0

    def unfinished_jobs(self, kind: str) -> list[JobRow]:
        """Jobs of every tenant that are queued or running (what a restarted service must pick up)."""
        with self._session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.kind == kind, JobRow.state.not_in(TERMINAL_STATES))
                                  .order_by(JobRow.created_at)))

    # Leases (services/common/leases.py) -----------------------------------------------------------

    def claim_jobs(self, kinds: tuple[str, ...], owner: str, lease_s: float, starting: bool = False) -> list[JobRow]:
        """Lease to `owner` the unfinished jobs of `kinds` that no live replica holds: those whose lease
        expired and, when `owner` is `starting`, its own from before a restart and those never leased.

        Rows another replica is claiming at the same moment are skipped (FOR UPDATE SKIP LOCKED on
        PostgreSQL; SQLite has one writer at a time), so concurrent claims take disjoint jobs.
        """
        now = utcnow()
        free = JobRow.lease_expires_at < now
        if starting:
            free = or_(free, JobRow.owner.is_(None), JobRow.owner == owner)
        with self._session() as s:
            rows = list(s.scalars(select(JobRow).where(JobRow.kind.in_(kinds), JobRow.state.not_in(TERMINAL_STATES),
                                                       free).order_by(JobRow.created_at)
                                  .with_for_update(skip_locked=True)))
            for row in rows:
                if row.owner not in (None, owner):
                    s.add(JobEventRow(job_id=row.id, state=row.state,
                                      log_line=f"replica {owner} took the job over from replica {row.owner}, "
                                               "whose lease expired"))
                row.owner, row.lease_expires_at = owner, now + dt.timedelta(seconds=lease_s)
            s.commit()
        if rows:
            self._notify()
        return rows

    def renew_leases(self, kinds: tuple[str, ...], owner: str, lease_s: float) -> set[str]:
        """Extend `owner`'s leases on its unfinished jobs of `kinds`; returns their ids (a job missing from
        them ended, or was taken over after the lease expired: the owner must stop running it)."""
        with self._session() as s:
            ids = s.scalars(update(JobRow).where(JobRow.kind.in_(kinds), JobRow.owner == owner,
                                                 JobRow.state.not_in(TERMINAL_STATES))
                            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
                            .returning(JobRow.id).execution_options(synchronize_session=False)).all()
            s.commit()
        return set(ids)

    def release_leases(self, kinds: tuple[str, ...], owner: str, job_id: str = "") -> None:
        """End `owner`'s leases (on one job, or all) now: the next claim of any replica takes them."""
        query = update(JobRow).where(JobRow.kind.in_(kinds), JobRow.owner == owner,
                                     JobRow.state.not_in(TERMINAL_STATES))
        if job_id:
            query = query.where(JobRow.id == job_id)
        with self._session() as s:
            s.execute(query.values(lease_expires_at=utcnow()).execution_options(synchronize_session=False))
            s.commit()

    def update_job(self, job_id: str, *, state: str | None = None, log_line: str = "", **fields: Any) -> JobRow:
        """Change a job's fields; a state change or a log line is also appended as an event.

        A job in a terminal state never changes state again (a late "failed" after "cancelled" is ignored).
        """
        with self._session() as s:
            # Locked (PostgreSQL) so that concurrent writers of one job take turns: a late terminal state sees
            # the first one, and the job's events get their ids in commit order, the order watchers read them.
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            if row.state in TERMINAL_STATES:
                state = None
            for key, value in fields.items():
                setattr(row, key, value)
            if state is not None and state != row.state:
                row.state = state
                s.add(JobEventRow(job_id=job_id, state=state, log_line=log_line))
            elif log_line:
                s.add(JobEventRow(job_id=job_id, state=row.state, log_line=log_line))
            row.updated_at = utcnow()
            s.commit()
        if state is not None and state in TERMINAL_STATES:
            _observe_end(row)
        self._notify()
        return row

    def events_after(self, job_id: str, after_id: int) -> list[JobEventRow]:
        with self._session() as s:
            return list(s.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.id > after_id)
                                  .order_by(JobEventRow.id)))

    def last_event_id(self, job_id: str) -> int:
        with self._session() as s:
            return s.scalar(select(func.max(JobEventRow.id)).where(JobEventRow.job_id == job_id)) or 0

    def wait_for_change(self, timeout: float) -> None:
        """Block until any job changes in this process, or `timeout` seconds pass."""
        with self._changed:
            self._changed.wait(timeout)

    def release_watchers(self) -> None:
        """Wake every watcher for good: the server is shutting down and its Watch streams must end."""
        self.watchers_released = True
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


def _observe_end(job: JobRow) -> None:
    """`customdiff_job_duration_seconds`: the job's time from creation to the terminal state it just took."""
    created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=dt.timezone.utc)
    JOB_SECONDS.labels(job.kind, job.state).observe(max(0.0, (utcnow() - created).total_seconds()))


def _insert_concept(s: Session, tenant: str, name: str, fields: dict[str, Any]) -> ConceptRow:
    """Add the next version of the tenant's concept `name` to the session."""
    latest = s.scalar(select(func.max(ConceptRow.version)).where(
        ConceptRow.tenant == tenant, ConceptRow.name == name)) or 0
    row = ConceptRow(tenant=tenant, name=name, version=latest + 1, **fields)
    s.add(row)
    return row


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
