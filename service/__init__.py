"""The HTTP front end: validates uploads, stores them, keeps job records in Redis and queues job ids for the
workers. Never imports torch."""
