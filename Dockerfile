# wsipipe container: `docker build -t wsipipe .` (CPU), or
# `docker build --build-arg TORCH=cuda -t wsipipe:cuda .` (the lock's CUDA torch; run with --gpus all).
# Dependencies are installed by scripts/install.sh, the same script `make install` runs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Pinned dependencies first: this layer is reused until the lock or the script changes.
COPY requirements.lock ./
COPY scripts/install.sh scripts/
RUN TORCH="${TORCH}" scripts/install.sh /opt/venv/bin/python deps
COPY pyproject.toml README.md ./
COPY wsipipe wsipipe
COPY flows flows
RUN scripts/install.sh /opt/venv/bin/python package

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="wsipipe" \
      org.opencontainers.image.description="Whole-slide pathology pipeline: tissue, Zarr patches, classifier, heatmaps, QuPath/OME outputs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 wsipipe \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin wsipipe
COPY --from=build /opt/venv /opt/venv
# Flow files and configs at a fixed path: Prefect docker/kubernetes deployments name
# flows/archive.py:process_archive relative to /opt/wsipipe (README, work pools).
COPY configs /opt/wsipipe/configs
COPY flows /opt/wsipipe/flows
COPY prefect.yaml /opt/wsipipe/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /home/wsipipe
# No ENTRYPOINT: the same image runs `dask worker ...` or `prefect worker ...` on a cluster.
CMD ["wsipipe", "--help"]
