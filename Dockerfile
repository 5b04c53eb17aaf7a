# megatron-probe: PROBE expert-parallel MoE inference on Megatron-Core, ready to serve the shipped
# tiny MoE with tools/run_probe_inference.py on CPU (gloo) or on GPUs (torchrun, NCCL).
#
#   docker build -t megatron-probe .
#   docker run --rm megatron-probe                                   # the inference script's help
#   docker run --rm --gpus all --ipc=host megatron-probe --compare   # torchrun over every GPU
#   docker run --rm megatron-probe --compare --max-requests 8        # no GPU: gloo, EP 2, on CPU
#
# Base image: NVIDIA's PyTorch container 25.11 (nvcr.io/nvidia/pytorch:25.11-py3). Why this tag:
# it is the image Megatron-LM's own CI builds megatron-core 0.16.x on (docker/.ngc_version.dev at
# the core_v0.16.1 tag), and it ships what this project needs on GPUs prebuilt for its CUDA, as
# published for that release: PyTorch 2.10.0a0 (NVIDIA build, CUDA 13.0, Python 3.12, Ubuntu
# 24.04), Transformer Engine 2.9 (megatron-core 0.16's tested range is 2.9 to 2.11; the PROBE
# expert backend "te" and FP8 use it), apex (NGC PyTorch images ship it; this project never
# imports it), NCCL and Nsight Systems (nsys, for examples/nsys_profile.sh).
# Not built on the development machines (no Docker engine there); see README "Container".
# Another NGC tag: docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 .
#
# The image's torch must stay: NGC images set PIP_CONSTRAINT=/etc/pip/constraint.txt (pins every
# package they ship), megatron-core is installed with --no-deps (its hard dependencies torch, numpy
# and packaging are the image's own), this package with --no-deps, and docker/check_image.py fails
# the build if torch changed anyway.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="megatron-probe" \
      org.opencontainers.image.description="PROBE expert-parallel MoE inference balancing for Megatron-Core" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROBE_HOME=/opt/megatron-probe

WORKDIR /opt/megatron-probe

# Remember the base image's torch, then add the dependencies:
# * megatron-core without its dependencies; the constraint file is lifted for this one package only
#   (in case the image pins another megatron-core), and --no-deps keeps it from touching anything else;
# * nvtx (NVTX ranges for nsys), tokenizers (the tiny model's tokenizer) and numba (the dispatch
#   split's compiled host loops) under the image's constraint file: where the image ships them its
#   versions stay (numba's numpy too), which is why they are only bounded below here, not pinned;
#   none depends on torch.
COPY docker/check_image.py docker/check_image.py
RUN python3 docker/check_image.py --record /opt/base-torch-version \
    && PIP_CONSTRAINT="" python3 -m pip install --no-cache-dir --no-deps "megatron-core==0.16.1" \
    && python3 -m pip install --no-cache-dir "nvtx>=0.2" "tokenizers>=0.19" "numba>=0.61"

# The package itself, editable: the code finds the shipped checkpoint and workloads beside the
# package (checkpoints/, workloads/ in this folder), which a site-packages copy would not.
COPY setup.cfg pyproject.toml README.md ./
COPY megatron_probe/ megatron_probe/
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation -e .

# The tools, the trained tiny MoE (about 26 MB) and the serving workloads (committed, small).
COPY tools/ tools/
COPY checkpoints/ checkpoints/
COPY workloads/ workloads/
COPY examples/ examples/
COPY docker/entrypoint.sh docker/entrypoint.sh
RUN python3 docker/check_image.py --check /opt/base-torch-version

# An unprivileged user (uid/gid 10001); results go to a mounted folder (--json, --plots-dir) or to
# results/ here, which it owns.
RUN groupadd --gid 10001 probe \
    && useradd --uid 10001 --gid 10001 --create-home --no-log-init --shell /bin/bash probe \
    && mkdir -p /opt/megatron-probe/results \
    && chown 10001:10001 /opt/megatron-probe/results
USER 10001:10001

ENTRYPOINT ["/opt/megatron-probe/docker/entrypoint.sh"]
CMD ["--help"]
