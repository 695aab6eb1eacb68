# The same steps as the README: install the locked dependencies, migrate, serve.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/imagetasks
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY app ./app
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --system --uid 10001 --home-dir /srv/imagetasks imagetasks \
    && mkdir -p var && chown imagetasks var
USER imagetasks

EXPOSE 8000
# uvicorn finishes in-flight requests on SIGTERM; the worker loops stop claiming
# and give back their leases.
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "imagetasks migrate && exec imagetasks serve --host 0.0.0.0 --port 8000"]
