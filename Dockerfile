# GPU image for avindex: CUDA 12 runtime (DALI cuda120 wheels, faiss-gpu), the `gpu` extra, `avindex` as entry point.
# Not buildable on the CPU-only development machines (no Docker engine there); see README "GPU hosts".
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/avindex
COPY pyproject.toml README.md ./
COPY avindex ./avindex
COPY kernels ./kernels
RUN python3 -m pip install --upgrade pip && python3 -m pip install '.[gpu]'

WORKDIR /data
ENTRYPOINT ["avindex"]
CMD ["--help"]
