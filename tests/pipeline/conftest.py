"""Fixtures for the pipeline tests: the data path's warehouses (DuckDB and PostgreSQL) and local store."""

from tests.datapath.conftest import duckdb_conn, local_store, postgres_conn, warehouse_conn  # noqa: F401 (fixtures)
