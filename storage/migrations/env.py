"""Alembic environment: migrations run on the connection ``storage.index.run_migrations`` passes."""

from alembic import context

from storage.index import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached when alembic is run by hand
    raise RuntimeError("run migrations with `pacs migrate` (storage.index.run_migrations)")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
