"""The failures that mean "Redis or the database is away (or refused this statement) for now": the callers that
carry on without them name this tuple, so a programming error (a KeyError, a TypeError) is never taken for an
outage."""
from __future__ import annotations

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

STORE_AWAY: tuple[type[BaseException], ...] = (RedisError, SQLAlchemyError)
