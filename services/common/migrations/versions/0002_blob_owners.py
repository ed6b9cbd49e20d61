"""Ownership of stored blobs per tenant: what a request may name, and what counts towards its storage quota.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_owners",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_blob_owners_digest", "blob_owners", ["digest"])
    # Training images of jobs recorded before this revision belong to the job's tenant (sizes unknown: 0).
    jobs = sa.table("jobs", sa.column("tenant", sa.String), sa.column("kind", sa.String),
                    sa.column("request", sa.JSON), sa.column("created_at", sa.DateTime(timezone=True)))
    owners = sa.table("blob_owners", sa.column("tenant", sa.String), sa.column("digest", sa.String),
                      sa.column("size_bytes", sa.BigInteger), sa.column("created_at", sa.DateTime(timezone=True)))
    connection = op.get_bind()
    seen, rows = set(), []
    for tenant, request, created in connection.execute(
            sa.select(jobs.c.tenant, jobs.c.request, jobs.c.created_at).where(jobs.c.kind == "training")):
        for concept in (request or {}).get("concepts", []):
            for uri in concept.get("images", []) + concept.get("classImages", []):
                digest = uri.removeprefix("sha256:")
                if (tenant, digest) not in seen:
                    seen.add((tenant, digest))
                    rows.append({"tenant": tenant, "digest": digest, "size_bytes": 0, "created_at": created})
    if rows:
        op.bulk_insert(owners, rows)


def downgrade() -> None:
    op.drop_index("ix_blob_owners_digest", "blob_owners")
    op.drop_table("blob_owners")
