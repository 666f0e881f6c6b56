"""Preflight: a mistake in the storage root, the source's columns or the model fails before anything
is extracted or paid for, and its message names the cause and what would be right."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest
from claude_batch.preflight import (
    GOOD_STORAGE_ROOTS,
    PreflightError,
    StorageRootError,
    check_model,
    check_source_columns,
    check_storage_root,
    check_workload_source,
    source_columns_query,
    template_fields,
)
from claude_batch.storage import ObjectStore
from claude_batch.warehouse import DuckDBDialect, PostgresDialect, SourceSpec
from claude_batch.workloads import Workload
from pydantic import BaseModel

from tests.dags.pipeline_dags import TINY_TRIAGE


class Approval(BaseModel):
    approve: bool


INVOICES = Workload(
    name="invoices",
    system_prompt="Decide whether to approve the invoice.",
    user_template="Vendor: {vendor}\nAmount: {amount}\nVendor again: {vendor}\nNotes: {notes}",
    model="claude-haiku-4-5",
    max_tokens=64,
    output_schema=Approval,
    text_fields=("vendor",),
)


# -- storage root ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("root", "canonical"),
    [
        ("s3://my-bucket", "s3://my-bucket"),
        ("s3://my-bucket/", "s3://my-bucket"),
        ("s3://my-bucket/claude-batch", "s3://my-bucket/claude-batch"),
        ("s3://my.bucket-2/a/b/c/", "s3://my.bucket-2/a/b/c"),
        ("s3://abc/x", "s3://abc/x"),
        ("s3://" + "a" * 63 + "/x", "s3://" + "a" * 63 + "/x"),
        ("/data/claude-batch", "file:///data/claude-batch"),
        ("/data/claude-batch/", "file:///data/claude-batch"),
        ("/data//claude-batch/./runs/../x", "file:///data/claude-batch/x"),
        ("file:///data/claude-batch", "file:///data/claude-batch"),
        ("file:///data/claude-batch/", "file:///data/claude-batch"),
    ],
)
def test_well_formed_roots_are_accepted_in_canonical_form(root, canonical):
    assert check_storage_root(root) == canonical
    assert check_storage_root(canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    ("root", "cause"),
    [
        ("s3:/bucket", "needs two slashes after s3: (s3://bucket)"),
        ("s3:bucket/prefix", "needs two slashes after s3: (s3://bucket/prefix)"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("S3://bucket", "write s3://bucket"),
        ("s3a://bucket/x", "write s3://bucket/x"),
        ("s3://ab", "bucket name of 2 characters"),
        ("s3://" + "a" * 64, "bucket name of 64 characters"),
        ("s3://My-Bucket/x", "uppercase letters in its bucket name"),
        ("s3://my_bucket/x", "bucket name 'my_bucket'"),
        ("s3://-bucket/x", "start and end with a letter or digit"),
        ("s3://bucket./x", "start and end with a letter or digit"),
        ("s3://my..bucket", "no '..'"),
        ("s3://192.168.10.1/x", "not IP addresses"),
        ("s3://bucket//x", "empty segment ('//')"),
        ("s3://bucket/a/../b", "'.' or '..' segment"),
        ("s3://bucket/a?versionId=1", "'?' or '#'"),
        ("s3://bucket:9000/x", "credentials or a port"),
        ("memory://", "in-process memory filesystem"),
        ("memory://store/x", "in-process memory filesystem"),
        ("gs://bucket/x", "unsupported scheme gs:"),
        ("https://bucket.s3.amazonaws.com/x", "unsupported scheme https:"),
        ("file://data/claude-batch", "has a host or a relative path after file://"),
        ("file:/data/claude-batch", "needs three slashes after file: (file:///data/claude-batch)"),
        ("claude-batch", "is a relative path"),
        ("./runs", "is a relative path"),
        ("~/claude-batch", "'~', which is not expanded"),
        ("/", "is the filesystem root"),
        ("file:///", "is the filesystem root"),
        ("", "is empty"),
        (" s3://bucket/x", "leading or trailing whitespace"),
        ("s3://bucket/x\n", "leading or trailing whitespace"),
        ("/data/\x00x", "control characters"),
    ],
)
def test_malformed_roots_are_refused_naming_the_root_and_a_good_form(root, cause):
    with pytest.raises(StorageRootError) as refused:
        check_storage_root(root)
    message = str(refused.value)
    assert cause in message
    assert GOOD_STORAGE_ROOTS in message
    if root:
        assert repr(root) in message
    assert isinstance(refused.value, PreflightError) and isinstance(refused.value, ValueError)


def test_credentials_in_a_root_are_not_repeated_in_the_message():
    with pytest.raises(StorageRootError) as refused:
        check_storage_root("s3://AKIAEXAMPLE:very-secret@bucket/x")
    message = str(refused.value)
    assert "very-secret" not in message and "AKIAEXAMPLE" not in message
    assert "'s3://***@bucket/x'" in message and "aws connection" in message


def test_memory_is_accepted_only_for_a_named_in_process_store():
    assert check_storage_root("memory://tests/store/", in_process=True) == "memory://tests/store"
    for root in ("memory://", "memory:///x", "memory:x"):
        with pytest.raises(StorageRootError, match="memory"):
            check_storage_root(root, in_process=True)


BAD_ROOTS = ["s3:/bucket", "s3:bucket", "s3://", "memory://", "gs://bucket/x", "relative/dir", "file:/tmp/x"]


@pytest.mark.parametrize("root", BAD_ROOTS)
def test_the_object_store_refuses_a_bad_root_and_writes_nothing(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the one-slash form used to become ./s3:/bucket
    with pytest.raises(StorageRootError, match="storage root"):
        ObjectStore(root)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("root", [*BAD_ROOTS, "memory://store/x"])
def test_the_airflow_entry_point_refuses_a_bad_root_before_reading_a_connection(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", "not a connection")  # never read
    with pytest.raises(StorageRootError, match="storage root"):
        ObjectStore.from_airflow(root, "aws_default")
    assert list(tmp_path.iterdir()) == []


def test_good_roots_build_the_same_store_as_before(tmp_path):
    store = ObjectStore(str(tmp_path / "root") + "/")
    assert (store.protocol, store.root_path, store.root) == (
        "file",
        str(tmp_path / "root"),
        f"file://{tmp_path}/root",
    )
    store.write_bytes("dag/run/x.json", b"{}")
    assert (tmp_path / "root" / "dag" / "run" / "x.json").read_bytes() == b"{}"
    assert ObjectStore(f"file://{tmp_path}/root").root == store.root
    assert ObjectStore.from_airflow(str(tmp_path / "root"), None).root == store.root
    s3 = ObjectStore("s3://my-bucket/claude-batch/", key="k", secret="s")
    assert (s3.protocol, s3.root_path, s3.root) == (
        "s3",
        "my-bucket/claude-batch",
        "s3://my-bucket/claude-batch",
    )
    memory = ObjectStore("memory://preflight-test/store")
    assert (memory.protocol, memory.root_path) == ("memory", "preflight-test/store")


def test_the_operator_refuses_a_one_slash_root_before_any_call(emulator, tmp_path, monkeypatch):
    from claude_batch.operators import ClaudeBatchOperator

    class TaskInstance:
        dag_id, task_id, map_index = "dag", "submit", 0

        def xcom_push(self, key, value):
            raise AssertionError("nothing may be pushed")

    monkeypatch.chdir(tmp_path)
    operator = ClaudeBatchOperator(
        task_id="submit", shard="dag/run/requests/part-00000.jsonl", storage_root="s3:/bucket", wait="none"
    )
    with pytest.raises(StorageRootError, match=r"'s3:/bucket' needs two slashes after s3: \(s3://bucket\)"):
        operator.execute({"ti": TaskInstance(), "run_id": "run-1"})
    assert emulator.stats()["http_requests"]["create"] == 0
    assert list(tmp_path.iterdir()) == []


# -- source columns -------------------------------------------------------------------------


def test_template_fields_are_the_workloads_own_in_order_without_repeats():
    assert template_fields(INVOICES) == ("vendor", "amount", "notes")
    assert template_fields(TINY_TRIAGE) == TINY_TRIAGE.template_fields


def test_a_source_with_every_column_passes():
    check_source_columns(
        ["invoice_id", "vendor", "amount", "notes", "created_at", "extra"],
        "invoice_id",
        "created_at",
        template_fields(INVOICES),
    )
    check_source_columns(
        ["invoice_id", "vendor", "amount", "notes", "created_at"],
        "invoice_id",
        "created_at",  # compared in SQL: it need not be selected
        template_fields(INVOICES),
        columns=("invoice_id", "vendor", "amount", "notes"),
    )
    check_source_columns(["id", "body"], "id", None, ("body",))


def test_a_missing_key_column_is_named():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(
            ["id", "vendor", "amount", "notes"], "invoice_id", None, template_fields(INVOICES)
        )
    message = str(refused.value)
    assert "key column 'invoice_id' is not a column of the source" in message
    assert "columns of the source: 'id', 'vendor', 'amount', 'notes'" in message
    assert "nothing was extracted or submitted" in message
    assert refused.value.problems == ("key column 'invoice_id' is not a column of the source",)


def test_a_key_column_differing_in_case_is_named_with_the_spelling_found():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(
            ["Invoice_ID", "vendor", "amount", "notes"],
            "invoice_id",
            None,
            template_fields(INVOICES),
            dialect_name="duckdb",
        )
    message = str(refused.value)
    assert (
        "key column 'invoice_id' is not a column of the source; found 'Invoice_ID'; names are case-sensitive"
        in message
    )
    assert "DuckDB matches identifiers in SQL regardless of case" in message


def test_the_postgres_hint_explains_quoting():
    with pytest.raises(PreflightError, match="does not fold it to lowercase"):
        check_source_columns(["ID", "body"], "id", None, ("body",), dialect_name="postgres")


def test_every_missing_template_field_is_named_with_its_braces():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(
            ["invoice_id", "Vendor", "amount"], "invoice_id", None, template_fields(INVOICES)
        )
    problems = refused.value.problems
    assert problems == (
        "template field {vendor} is not a column of the source; found 'Vendor'; names are case-sensitive: "
        "staging looks fields up by exact name",
        "template field {notes} is not a column of the source",
    )
    assert "lacks 2 column(s)" in str(refused.value)


def test_a_close_spelling_is_suggested():
    with pytest.raises(
        PreflightError,
        match=r"template field \{amount\} is not a column of the source; did you mean 'ammount'\?",
    ):
        check_source_columns(
            ["invoice_id", "vendor", "ammount", "notes"], "invoice_id", None, template_fields(INVOICES)
        )


def test_a_missing_interval_column_is_named():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(["id", "body", "createdAt"], "id", "created_at", ("body",))
    assert refused.value.problems == (
        "interval column 'created_at' is not a column of the source; did you mean 'createdAt'?",
    )


def test_an_interval_column_differing_in_case_is_refused_too():
    with pytest.raises(
        PreflightError, match="interval column 'created_at' .* found 'CREATED_AT'; names are case-sensitive"
    ):
        check_source_columns(["id", "body", "CREATED_AT"], "id", "created_at", ("body",))


def test_a_missing_selected_column_is_named():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(["id", "body"], "id", None, ("body",), columns=("id", "body", "priority"))
    assert refused.value.problems == ("selected column 'priority' is not a column of the source",)


def test_fields_left_out_of_the_selected_columns_are_named():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(
            ["invoice_id", "vendor", "amount", "notes"],
            "invoice_id",
            None,
            template_fields(INVOICES),
            columns=("vendor", "amount"),
        )
    assert refused.value.problems == (
        "key column 'invoice_id' is not among the selected columns ('vendor', 'amount'): "
        "add 'invoice_id' to columns",
        "template field {notes} is not among the selected columns ('vendor', 'amount'): "
        "add 'notes' to columns",
    )


def test_a_field_neither_selected_nor_in_the_source_is_named_once():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(["id", "Body"], "id", None, ("body",), columns=("id",))
    assert refused.value.problems == (
        "template field {body} is not among the selected columns ('id'): add 'body' to columns, and the "
        "source has no such column either; found 'Body'; names are case-sensitive: "
        "staging looks fields up by exact name",
    )


def test_a_selected_column_missing_from_the_source_is_named_once_with_its_role():
    with pytest.raises(PreflightError) as refused:
        check_source_columns(["id", "text"], "id", None, ("body",), columns=("id", "body"))
    assert refused.value.problems == ("template field {body} is not a column of the source",)


def test_a_wide_source_is_listed_in_part():
    available = [f"c{i:03d}" for i in range(100)]
    with pytest.raises(PreflightError) as refused:
        check_source_columns(available, "id", None, ())
    assert "'c039', ... (60 more)" in str(refused.value) and "'c040'" not in str(refused.value)


def test_the_workload_and_source_spec_are_checked_together():
    source = SourceSpec(table="invoices", key_column="invoice_id", interval_column="created_at")
    with pytest.raises(PreflightError) as refused:
        check_workload_source(
            ["Invoice_ID", "vendor", "amount", "notes"], INVOICES, source, dialect_name="duckdb"
        )
    message = str(refused.value)
    assert message.startswith("the source invoices lacks 2 column(s)")
    assert "key column 'invoice_id' is not a column of the source; found 'Invoice_ID'" in message
    assert "interval column 'created_at' is not a column of the source" in message
    query = SourceSpec(query="SELECT * FROM invoices", key_column="invoice_id")
    with pytest.raises(PreflightError, match="^the source query lacks 1 column"):
        check_workload_source(["invoice_id", "vendor", "amount"], INVOICES, query)


def _duckdb_columns(conn, source: SourceSpec) -> list[str]:
    sql, params = source_columns_query(source, DuckDBDialect())
    cursor = conn.execute(sql, params)
    assert cursor.fetchall() == []
    return [column[0] for column in cursor.description]


def test_the_source_columns_come_from_duckdb_without_reading_a_row():
    conn = duckdb.connect()
    conn.execute('CREATE TABLE invoices ("Invoice_ID" VARCHAR, vendor VARCHAR, amount DOUBLE, notes VARCHAR)')
    conn.execute("INSERT INTO invoices VALUES ('a', 'v', 1.0, '50% off')")
    table = SourceSpec(table="invoices", key_column="invoice_id")
    assert _duckdb_columns(conn, table) == ["Invoice_ID", "vendor", "amount", "notes"]
    query = SourceSpec(
        query="SELECT \"Invoice_ID\" AS invoice_id, vendor, notes FROM invoices WHERE notes LIKE '%off'",
        key_column="invoice_id",
    )
    assert _duckdb_columns(conn, query) == ["invoice_id", "vendor", "notes"]
    # The mistake that made every row dead: DuckDB's SQL takes the key in any case...
    assert conn.execute('SELECT src."invoice_id" FROM invoices src').fetchall() == [("a",)]
    # ...but the rows carry "Invoice_ID"; preflight names it before anything is extracted.
    with pytest.raises(PreflightError, match="found 'Invoice_ID'; names are case-sensitive"):
        check_workload_source(_duckdb_columns(conn, table), INVOICES, table, dialect_name="duckdb")
    with pytest.raises(PreflightError, match=r"template field \{amount\} is not a column"):
        check_workload_source(_duckdb_columns(conn, query), INVOICES, query, dialect_name="duckdb")


def test_the_source_columns_come_from_postgres_with_a_literal_percent(postgres_dsn):
    import psycopg2

    conn = psycopg2.connect(postgres_dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute('CREATE TABLE invoices ("Invoice_ID" TEXT, vendor TEXT, notes TEXT)')
            source = SourceSpec(
                query="SELECT * FROM invoices WHERE notes LIKE '%off'", key_column="invoice_id"
            )
            sql, params = source_columns_query(source, PostgresDialect())
            cursor.execute(sql, tuple(params))
            assert cursor.fetchall() == []
            assert [column[0] for column in cursor.description] == ["Invoice_ID", "vendor", "notes"]
        conn.rollback()
    finally:
        conn.close()
    sql, params = source_columns_query(
        SourceSpec(table="invoices", key_column="invoice_id"), PostgresDialect()
    )
    assert sql == 'SELECT * FROM "invoices" src LIMIT %s' and params == [0]


# -- models ---------------------------------------------------------------------------------


def test_an_allowed_model_passes():
    check_model("claude-haiku-4-5", ("claude-haiku-4-5", "claude-sonnet-4-5"))


def test_a_model_not_allowed_is_named_with_the_allowed_list():
    with pytest.raises(PreflightError) as refused:
        check_model("claude-opus-4-6", ("claude-haiku-4-5", "claude-sonnet-4-5"))
    assert str(refused.value) == (
        "model 'claude-opus-4-6' is not one of the allowed models ['claude-haiku-4-5', 'claude-sonnet-4-5']"
    )


def test_a_near_miss_model_is_suggested_and_the_role_named():
    with pytest.raises(PreflightError) as refused:
        check_model(
            "claude-haiku-4.5", ("claude-haiku-4-5", "claude-sonnet-4-5"), role="the workload's model"
        )
    assert str(refused.value) == (
        "the workload's model 'claude-haiku-4.5' is not one of the allowed models "
        "['claude-haiku-4-5', 'claude-sonnet-4-5']; did you mean 'claude-haiku-4-5'?"
    )


@pytest.mark.parametrize("model", ["", None])
def test_an_empty_model_is_refused(model):
    with pytest.raises(PreflightError, match="is not a model id; allowed models"):
        check_model(model, ("claude-haiku-4-5",))


def test_an_empty_allowed_list_is_a_mistake_not_a_pass():
    with pytest.raises(PreflightError, match="the allowed models are empty"):
        check_model("claude-haiku-4-5", ())


def test_preflight_imports_no_airflow():
    import subprocess
    import sys

    code = (
        "import sys, claude_batch.preflight, claude_batch.storage; "
        "print(any(m.split('.')[0] == 'airflow' for m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "plugins")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
