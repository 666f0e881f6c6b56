"""Fixtures for the security tests: the corpus DAG run (with canary secrets), shared with tests/reliability."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def corpus_run(airflow_db, moto_endpoint, tmp_path_factory):
    """cb_reliability_corpus run once per session with a canary API key and AWS secret."""
    from tests.reliability.corpus import run_corpus

    return run_corpus(tmp_path_factory.mktemp("corpus"), moto_endpoint, airflow_db)
