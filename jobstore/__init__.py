"""What the API and the workers share: the job records, the Redis store and its lease protocol, the database of
history, audit, corrections and model versions, and the connections to Redis and PostgreSQL. Knows nothing of HTTP,
Celery tasks, torch or the method."""
