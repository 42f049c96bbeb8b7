"""Alembic environment: runs the migrations against the URL handed in by ``mailer.store.db``."""

from __future__ import annotations

from alembic import context

from mailer.store.db import make_engine
from mailer.store.schema import metadata

config = context.config
url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("no database URL given to the migrations")

engine = make_engine(url)
# A write transaction (on SQLite: BEGIN IMMEDIATE), which Alembic runs the migrations in.
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
