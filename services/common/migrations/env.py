"""Alembic environment: migrations run from `Registry.migrate()`, which passes the engine's connection."""

from alembic import context

from services.common.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
