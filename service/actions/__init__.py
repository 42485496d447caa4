"""What a tenant can do, as plain functions over explicit arguments (the settings, the job store, the file
storage, the queue, the tenant and the actor): submit, cancel and download jobs (jobs.py), send corrections
(corrections.py), read, retrain and promote models (models.py), and follow jobs as server-sent events (events.py).

The API's routes (service/routes/) parse a request, call one of these and shape the response; the web console
(service/console/) calls the same functions, so a page does what the API does: the same checks, the same refusals
(an HTTPException with the API's status and detail), the same audit events."""
