# syntax=docker/dockerfile:1
# The cluster image: PyTorch 2.11 + CUDA 12.8 + Triton 3.6 (what our GPU machines run, DESIGN.md
# §9), this package with pinned dependencies (docker/constraints.txt), torchrun as entry point.
#
#   docker build -t mdn-scale:0.1.0 .
#   docker run --rm --gpus all --ipc=host --network=host -v /data:/data mdn-scale:0.1.0 \
#       --standalone --nproc-per-node 8 launch/pretrain.py --config configs/mdn_400m.yaml ...
#
# On SLURM (docs/multinode.md): convert it for the site's container runtime (enroot/pyxis:
# `enroot import dockerd://mdn-scale:0.1.0`) and give pretrain.sbatch
# MDN_SRUN_ARGS="--container-image=... --container-mounts=..." and MDN_TASK_ROOT=/opt/mdn_scale.
#
# Pin the base by digest for reproducible builds: BASE_IMAGE=pytorch/pytorch:2.11.0-...@sha256:...
# (this file names the tag only: it was written and linted on a machine with no Docker engine
# and no registry access, and has not been built).
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# devel, not runtime: Triton compiles its launcher stubs with the C compiler at first use.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    NCCL_NVLS_ENABLE=0 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# procps: pkill for launch/slurm/node.sh's signal forwarding; git: the commit in job logs.
# Versions follow the base image's Ubuntu release (no pins: its archive drops old versions).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mdn_scale

# Dependencies first (a layer that survives source edits), then the package itself.
COPY docker/constraints.txt docker/constraints.txt
RUN grep -v -E '^(#|torch==|triton==|$)' docker/constraints.txt > /tmp/requirements.txt \
    && pip install --constraint docker/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY kernels kernels
COPY mdn_scale mdn_scale
RUN pip install --no-deps --constraint docker/constraints.txt . \
    && python -c "import torch, triton, megatron.core, mdn_scale, mdn_kernels; print('torch', torch.__version__, 'triton', triton.__version__)"

COPY launch launch
COPY configs configs
COPY tools tools

ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc-per-node", "1", "launch/pretrain.py"]
