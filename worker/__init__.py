"""The workers and the command line: the Celery tasks (tasks/), the pipeline from a file to masks and reports
(pipeline.py), the `isl` CLI (cli.py over commands/), the demo and the whole service as local processes."""
