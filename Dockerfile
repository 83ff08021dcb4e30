# The embedding_assets code location, the Dagster webserver and daemon, and the retrieval service
# (see docker-compose.yml). .dockerignore keeps local stores, venvs and caches out of the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home \
    DAGSTER_COMPUTE_LOGS_DIR=/opt/dagster/compute-logs

WORKDIR /app
COPY pyproject.toml README.md ./
COPY embedding_assets ./embedding_assets
RUN pip install --no-cache-dir -e ".[deploy]"

COPY model_versions.toml workspace.yaml ./
COPY data ./data
COPY deploy/dagster.yaml ${DAGSTER_HOME}/dagster.yaml

EXPOSE 3000 8080
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "workspace.yaml"]
