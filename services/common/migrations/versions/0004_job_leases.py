"""Job leases: the replica that runs a job (`owner`) and until when its lease holds (`lease_expires_at`).

Jobs from before leases have neither; a replica takes them over when it starts.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.String(253), nullable=True))
    op.add_column("jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops columns by rebuilding the table
        batch.drop_column("lease_expires_at")
        batch.drop_column("owner")
