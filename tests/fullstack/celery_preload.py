"""Celery settings for the full-stack worker: Airflow's defaults plus the pipeline's imports, preloaded.

Every task process is forked from a Celery pool process, and Airflow's worker already imports a
few expensive modules there once (on Celery's ``import_modules`` signal) so that tasks need not.
The pipeline's modules pull in the anthropic SDK, pyarrow and pydantic models: about 3 s of CPU
for each task that imports them afresh, the largest part of a short task's cost on this 2-core
machine. Listed in Celery's ``imports``, they load once per worker. A deployment can do the same
with ``[celery] celery_config_options`` pointing at a dict like this one.
"""

from __future__ import annotations

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

CELERY_CONFIG = {
    **DEFAULT_CELERY_CONFIG,
    "imports": (
        "claude_batch.pipeline",
        "claude_batch.operators",
        "claude_batch.sensors",
        "airflow.dag_processing.dagbag",
        "airflow.providers.amazon.aws.hooks.s3",
        "airflow.providers.postgres.hooks.postgres",
    ),
}
