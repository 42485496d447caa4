"""What the API and the workers share: the job records, the Redis store and its lease protocol, the database of
history, audit, corrections and model versions, and the connections to Redis and PostgreSQL. Knows nothing of HTTP,
Celery tasks, torch or the method; a setting it needs is passed in (service/settings.py stays with the service).

- records.py: the typed job and batch records (pydantic) and the job states, as Redis and the API hold them
- store.py: `JobStore`, the one entry point: job records, idempotency, batches, history kept in the database
- keys.py, lease.py, stats.py: its parts: revoked keys and sessions; delivery, leases and sweeps; what /metrics reads
- base.py: what the parts share (the Redis client, the key prefix, reading the database while Redis is away)
- database.py, registry.py: `Records`, the queries of the database (jobs, audit; corrections, trainings, versions)
- tables.py, rows.py: the tables (SQLAlchemy) and the typed records the queries hand back (frozen dataclasses)
- migrations/: the Alembic migrations of those tables
- redisconn.py: connections to Redis or its sentinels, and the broker's settings
- errors.py: STORE_AWAY, the failures that mean Redis or the database is away"""
