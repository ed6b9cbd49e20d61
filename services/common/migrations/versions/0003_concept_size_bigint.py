"""Concept sizes in 64 bits, like blob sizes: PostgreSQL's INTEGER stops at 2 GiB.

SQLite's INTEGER is already 64 bits wide, and altering a column there would rebuild the table (and, with
foreign keys on, unlink every job from its concept): nothing to do on SQLite.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("concepts", "size_bytes", type_=sa.BigInteger, existing_type=sa.Integer,
                        existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("concepts", "size_bytes", type_=sa.Integer, existing_type=sa.BigInteger,
                        existing_nullable=False)
