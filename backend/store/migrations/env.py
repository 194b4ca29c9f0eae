"""Alembic's entry point: migrations run on the connection `backend.store.db.migrate` hands over."""

from __future__ import annotations

from alembic import context

from backend.store.db import described, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    include_object=described,
)
with context.begin_transaction():
    context.run_migrations()
