# The image: the locked dependencies and the project (a regular, non-editable
# install) in a virtual environment, run as a non-root user. The base is any
# image with python3 (3.11+) on PATH and its venv module, like the official one.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PROGRESS_BAR=off
RUN python3 -m venv /opt/venv
# Dependencies first, from the hashed lock only, so this layer survives code changes.
COPY requirements.lock /src/
RUN /opt/venv/bin/pip install --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY migrations /src/migrations
COPY app /src/app
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/venv/bin/imagetasks --help > /dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --no-log-init --create-home --home-dir /srv/imagetasks imagetasks
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv/imagetasks
USER imagetasks

EXPOSE 8000
# Migrations are a step of their own (`imagetasks migrate`, the `migrate` service
# in docker-compose.yml), run once per release, not by every replica.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# uvicorn finishes in-flight requests on SIGTERM; the worker loops stop claiming
# and give back their leases.
STOPSIGNAL SIGTERM
CMD ["imagetasks", "serve", "--host", "0.0.0.0", "--port", "8000"]
