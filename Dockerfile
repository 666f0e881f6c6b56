# The image every Airflow service of docker-compose.yaml runs, plus the S3 stand-in and the
# Claude API emulator: the official Airflow image with the project's pinned dependency set and
# the claude-batch package (operators, sensors, triggers, the plugin and the emulator).
FROM apache/airflow:3.3.2-python3.11

# The pinned set first, in its own layer: it changes less often than the code. apache-airflow is
# pinned in it to the base image's version, so pip never swaps the Airflow it runs on.
COPY --chown=airflow:root requirements.txt /opt/claude-batch/requirements.txt
RUN pip install --no-cache-dir -r /opt/claude-batch/requirements.txt

# The package itself, without touching the pinned dependencies again.
COPY --chown=airflow:root pyproject.toml README.md /opt/claude-batch/
COPY --chown=airflow:root plugins /opt/claude-batch/plugins
COPY --chown=airflow:root include/prices.json /opt/claude-batch/include/prices.json
RUN pip install --no-cache-dir --no-deps /opt/claude-batch

# The workload DAGs and what they read (prompts, prices, sample data), where the DAG files
# look for it: include/ beside dags/.
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root include /opt/airflow/include
# The installed package carries the price table it was built with; point it at the copy above
# instead, so editing include/prices.json takes effect without rebuilding the image.
ENV CLAUDE_BATCH_PRICES=/opt/airflow/include/prices.json
