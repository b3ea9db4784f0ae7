# One image for every genqueue process: workers, beat, Flower, the exporter and the simulator.
# Slim and non-root: the build stage turns the project into wheels; the runtime stage holds only them.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY genq ./genq
COPY config ./config
COPY workers ./workers
COPY tasks ./tasks
COPY simulator ./simulator
# The versions tested (constraints.txt): genq/worker/kombu_fix.py refuses any other kombu.
RUN pip wheel -c constraints.txt --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --create-home --uid 10001 genq \
    && mkdir -p /data/downloads && chown genq /data/downloads
WORKDIR /home/genq
USER genq
ENV GENQ_DOWNLOAD_DIR=/data/downloads
# Flower, the Prometheus exporter, the simulator (dev only).
EXPOSE 5555 9818 8900
