# syntax=docker/dockerfile:1
# One image for every role: the role is the command (`moemesh gateway|router|expert ...`, `moemesh health ...`).
#
#   docker build -t moemesh .                                  # CPU torch, model mounted at /models/model
#   docker build --build-arg MODEL_DIR=checkpoints/mixtral -t moemesh .   # bakes a checkpoint from the context
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t moemesh:cuda .
#
# docs/operations.md has the details.

# Any image with Debian/Ubuntu's apt; Python 3.11+ is installed from apt when the image has none (CUDA images).
ARG BASE_IMAGE=python:3.12-slim-bookworm

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

FROM base AS build
# The wheel index torch comes from: CPU by default, a CUDA one (e.g. .../whl/cu128) with a CUDA base image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY scripts/gen_protos.py scripts/gen_protos.py
COPY moemesh moemesh
COPY services services
# The protobuf code is generated here (grpcio-tools is a build tool only: removed before the copy to runtime).
RUN pip install --no-cache-dir "grpcio-tools==1.85.1" \
    && python scripts/gen_protos.py \
    && pip install --no-cache-dir . \
    && pip uninstall -y grpcio-tools

FROM base AS runtime
ARG MODEL_DIR=deploy/docker/model
RUN useradd --system --uid 10001 --user-group --home-dir /home/moemesh --create-home moemesh
COPY --from=build /opt/venv /opt/venv
# MODEL_DIR (a directory of the build context) is copied to /models/model; by default that is an empty
# placeholder, and the checkpoint is mounted there at run time instead.
COPY --chown=moemesh:moemesh ${MODEL_DIR} /models/model
# The demo bot (3 MB, trained by `make demo-model`) is always in the image, at /models/demo.
COPY --chown=moemesh:moemesh models/demo-bot /models/demo
ENV MOEMESH_MODEL=/models/model \
    MOEMESH_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/moemesh
# Conventional ports (docs/operations.md): gateway 50051, router 7000, expert 7001; metrics 9100-9102.
EXPOSE 50051 7000 7001 9100 9101 9102
ENTRYPOINT ["moemesh"]
CMD ["--help"]
