# One image for every genqueue process: workers, flower, simulator.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY genq ./genq
COPY config ./config
COPY workers ./workers
COPY tasks ./tasks
COPY simulator ./simulator
RUN pip install . && useradd --create-home --uid 10001 genq && mkdir -p /data/downloads && chown genq /data/downloads
USER genq
ENV GENQ_DOWNLOAD_DIR=/data/downloads
