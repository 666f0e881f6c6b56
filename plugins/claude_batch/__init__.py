"""claude-batch: the Claude Message Batches API for Apache Airflow 3."""

import os

# Arrow's memory pool for the data path: the C library's malloc, which reuses what Arrow frees
# instead of keeping it per thread (see claude_batch.tuning). pyarrow reads the variable when it
# is first imported, so it is set here, before any module of the package imports pyarrow; a pool
# chosen in the environment is kept.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
