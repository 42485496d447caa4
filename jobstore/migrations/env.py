"""Alembic's environment for the service's database: it runs on the connection that jobstore/database.py
(`Records.upgrade`, `isl db upgrade`) hands over, holding the migration lock."""
from __future__ import annotations

from alembic import context

from jobstore.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through `isl db upgrade` (jobstore/database.py), which passes the "
                       "connection")
# batch mode: SQLite changes tables by copying them, which plain ALTER cannot always do
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
