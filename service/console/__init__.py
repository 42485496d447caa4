"""The web console: server-rendered pages (Jinja2, no build step) for operators and radiologists, served by the API
process, which still never imports torch. Its pages call the API's own actions (service/actions/), so a page does
what the API does, with the same checks, refusals and audit events.

    pages.py       how a page is made: timing and security headers, templates and their filters
    session.py     sign-in (a tenant's API key, once), sign-out, the session and CSRF check every page uses
    jobs.py        the job list and upload, a job's page, correction, downloads, previews, the event stream
    models.py      the model pages: versions, lineage, curves, agreement; promotion
    operations.py  workers, queues and failures of every tenant, for the operator tenants"""
from __future__ import annotations

from service.console import jobs, models, operations, session
from service.console.session import SESSION, SignedOut, live_session

__all__ = ["SESSION", "install", "live_session"]


def install(app) -> None:
    """Include the console's routes and send a signed-out browser to the sign-in page."""
    for module in (session, jobs, models, operations):
        app.include_router(module.router)
    app.add_exception_handler(SignedOut, session.signed_out)
