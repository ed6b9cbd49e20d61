"""Registry tables. The schema is created and migrated only by alembic (services/common/migrations)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class ConceptRow(Base):
    """One version of a tenant's concept; the artifact itself lives in the store under `digest`."""

    __tablename__ = "concepts"
    __table_args__ = (UniqueConstraint("tenant", "name", "version", name="uq_concept_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    tokens: Mapped[list[str]] = mapped_column(JSON)
    class_words: Mapped[list[str]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRow(Base):
    """A training, merge or compression job of one tenant."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_kind", "tenant", "kind"),
        # Idempotency: one job per (tenant, kind, request_id) when a request_id is given.
        Index("uq_jobs_request_id", "tenant", "kind", "request_id", unique=True,
              sqlite_where=text("request_id != ''"), postgresql_where=text("request_id != ''")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # training | merge | compress
    state: Mapped[str] = mapped_column(String(16))  # queued | running | succeeded | failed | cancelled
    # Idempotency key (AIP-155); empty when the caller gave none.
    request_id: Mapped[str] = mapped_column(String(128), default="")
    concept_name: Mapped[str] = mapped_column(String(128))
    # The validated request (proto as JSON), so Get/List can return what was asked for.
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error_message: Mapped[str] = mapped_column(Text, default="")
    work_dir: Mapped[str] = mapped_column(Text, default="")
    # The replica that runs the job and until when its lease holds (services/common/leases.py); no
    # owner: no replica ever leased it (a row from before leases).
    owner: Mapped[str | None] = mapped_column(String(253), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    concept_id: Mapped[int | None] = mapped_column(ForeignKey("concepts.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobEventRow(Base):
    """Every state change and progress line of a job, in order; Watch streams these."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    log_line: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BlobOwnerRow(Base):
    """A tenant owns a blob of the store (a training image it sent): it may name it, and it counts
    towards its storage quota. One deduplicated blob can belong to several tenants. Concept artifacts
    are owned through their `concepts` rows."""

    __tablename__ = "blob_owners"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
