"""claude-batch: the Claude Message Batches API for Apache Airflow 3."""
