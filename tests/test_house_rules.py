"""The house rules of docs/architecture.md, checked on the package as it is.

No module over 500 lines and no class over 300 (the emulator and the demo are tools, but they
keep the rule too today); the plain-Python core imports no Airflow, so a reader (and a process
that only collects or validates) never pays for it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugins" / "claude_batch"
MODULE_LINES = 500
CLASS_LINES = 300
# Modules a collect/validate/load process or a reader of the steps imports: none may load Airflow.
AIRFLOW_FREE = [
    "claude_batch.steps",
    "claude_batch.waiting",
    "claude_batch.snapshots",
    "claude_batch.paging",
    "claude_batch.errors",
    "claude_batch.poller",
    "claude_batch.results",
    "claude_batch.validation",
    "claude_batch.staging.manifest",
    "claude_batch.warehouse",
    "claude_batch.pilot",
]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MODULE_LINES
    }
    assert not long, f"modules over {MODULE_LINES} lines: {long}"


def test_no_class_over_300_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES:
                long[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, f"classes over {CLASS_LINES} lines: {long}"


@pytest.mark.parametrize("module", AIRFLOW_FREE)
def test_the_core_imports_no_airflow(module):
    probe = (
        f"import sys, {module}\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert loaded == "", f"importing {module} loads Airflow: {loaded[:300]}"
