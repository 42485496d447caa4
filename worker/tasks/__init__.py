"""The Celery glue of the workers: `app` (worker/tasks/app.py) and its one task `isl.refine`
(worker/tasks/refine.py), which runs a job under its lease (worker/tasks/lease.py) and pushes DICOM SEG results
by STOW-RS (worker/tasks/stow.py); `settings` are the worker's (worker/tasks/settings.py). `isl worker` starts
`app`."""
from worker.tasks import lease, refine  # noqa: F401 - registers the task and the heartbeat with the app
from worker.tasks.app import app, settings

__all__ = ["app", "settings"]
