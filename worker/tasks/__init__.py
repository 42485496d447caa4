"""The Celery glue of the workers: `app` (worker/tasks/app.py) and its tasks: `isl.refine` (worker/tasks/refine.py),
which runs a job under its lease (worker/tasks/lease.py) on the tenant's live model version and pushes DICOM results
(worker/tasks/stow.py, worker/tasks/dimse.py), and `isl.retrain` (worker/tasks/train.py), which makes a new model
version from the corrections; `settings` are the worker's (worker/tasks/settings.py). `isl worker` starts `app`."""
from worker.tasks import lease, refine, train  # noqa: F401 - registers the tasks and the heartbeat with the app
from worker.tasks.app import app, settings

__all__ = ["app", "settings"]
