# immich-thumbnail-exporter: Prometheus exporter for Immich thumbnails and job queues.
#
#   docker build -t immich-thumbnail-exporter .
#   docker run --rm -p 9813:9813 --env-file /path/to/immich/.env \
#     -v /path/to/immich/library:/data:ro immich-thumbnail-exporter
#
#   podman build --format docker -t immich-thumbnail-exporter .   (docker format: keeps the HEALTHCHECK)
#
# Two stages: the first builds a virtual environment with the project and its dependencies, the second
# copies only that environment onto a clean python:3.11-slim and runs as an unprivileged numeric user.
# No `# syntax=` line: it makes BuildKit fetch a Dockerfile parser image before building, so a machine
# that already has the base image could not build offline. `RUN --mount=type=cache` needs no such line
# with BuildKit (Docker 23 and later) or buildah/podman.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the package needs (no .git, no local virtual environments). README* and LICENSE* are
# copied when present: pyproject.toml refers to README.md.
COPY pyproject.toml README* LICENSE* ./
COPY exporter/ ./exporter/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && immich-thumbnail-exporter --help > /dev/null


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="immich-thumbnail-exporter" \
      org.opencontainers.image.description="Prometheus exporter for missing Immich thumbnails and stuck thumbnail jobs" \
      org.opencontainers.image.source="https://github.com/immich-thumbnail-exporter/immich-thumbnail-exporter" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric uid/gid so that Kubernetes' runAsNonRoot can verify it. The state directory is created with
# the right owner, so a fresh Docker volume mounted there inherits it.
# Not --system: system accounts stop at uid 999, and useradd warns about 10001. --no-log-init: no sparse
# lastlog entry for a high uid.
RUN groupadd --gid 10001 exporter \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/immich-thumbnail-exporter --shell /usr/sbin/nologin exporter \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/immich-thumbnail-exporter

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /var/lib/immich-thumbnail-exporter
EXPOSE 9813

# /healthz answers whenever the process runs (it never waits on Immich's database or Redis). Adjust or
# disable this check if you change --web.listen-address or serve TLS with --web.config.file.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9813/healthz', timeout=4)"]

ENTRYPOINT ["immich-thumbnail-exporter"]
CMD ["serve"]
