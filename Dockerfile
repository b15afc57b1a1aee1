# pfp-deploy, CPU image: optimize, export and benchmark on an x86-64 / arm64 Linux host.
#
# Build (anywhere with access to PyPI and PyPI's CPU wheel index for torch):
#   docker build -t pfp-deploy .
# Build options (all --build-arg):
#   BASE_IMAGE       any Debian/Ubuntu-based image with python3 (3.10+) and its venv module
#                    (default docker.io/library/python:3.11-slim; offline: docker/build_base_image.sh
#                    makes localhost/pfp-base:bookworm-py311 from a Debian mirror)
#   TORCH_INDEX_URL  where torch/torchvision come from (default PyTorch's CPU wheel index: PyPI's torch
#                    bundles CUDA libraries, ~4 GB more, that a CPU image never uses)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT   pip's own settings for every install
#                    (a mirror, local file indexes, a CA bundle); build-time only, not kept in the image
# With podman on a host without a registry: `make docker` (docker/build_image.sh, docs/docker.md).
#
# Run (writes ./runs as you, reads the data read-only):
#   docker run --rm --user "$(id -u):$(id -g)" \
#     -v /usr/share/datasets/fashion-mnist:/usr/share/datasets/fashion-mnist:ro \
#     -v "$PWD/runs:/work/runs" \
#     pfp-deploy optimize --recipe recipes/fashion_mnist_quickstart.yaml
#
# --user lets the container write into your ./runs (without it the process is the image's non-root
# user "pfp", uid 1000). Your own recipes: mount them too (-v $PWD/my.yaml:/work/my.yaml:ro ... --recipe
# my.yaml). Torchvision weights are never downloaded: mount the torch hub cache for tagged weights, e.g.
#   -v ~/.cache/torch:/work/.cache/torch:ro
ARG BASE_IMAGE=docker.io/library/python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The project's pins (pyproject.toml); tests/test_docker.py checks that they agree.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CERT=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/work/.cache/torch \
    VIRTUAL_ENV=/opt/pfp-deploy \
    PATH=/opt/pfp-deploy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# A venv, so that the same steps work on python:3.11-slim and on Debian's own python3 (whose system
# site-packages pip refuses to touch, PEP 668).
RUN python3 -c 'import sys, venv; assert sys.version_info >= (3, 10), "pfp-deploy needs Python 3.10+"' \
    && python3 -m venv /opt/pfp-deploy

# Torch first, from TORCH_INDEX_URL (PIP_INDEX_URL stays an extra index for torch's own dependencies;
# with PyTorch's CPU index "2.14.1+cpu" wins over PyPI's CUDA "2.14.1"). It satisfies the project's
# torch==2.14.1 pin, so the next step keeps it. Empty pip settings are unset, not passed empty.
RUN set -eu; \
    for v in PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT; do eval "test -n \"\${$v:-}\"" || unset "$v"; done; \
    export PIP_EXTRA_INDEX_URL="$PIP_INDEX_URL ${PIP_EXTRA_INDEX_URL:-}"; \
    pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"; \
    python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pfp_deploy ./pfp_deploy
RUN set -eu; \
    for v in PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT; do eval "test -n \"\${$v:-}\"" || unset "$v"; done; \
    pip install '.[deploy,report]'; \
    cd / && rm -rf /src && pfp-deploy --help >/dev/null

RUN useradd --create-home --uid 1000 --user-group pfp
WORKDIR /work
COPY recipes ./recipes
COPY weights ./weights
# runs/ is usually a mount; 1777 so that any --user can write it when it is not.
RUN mkdir -p runs .cache/torch && chown pfp:pfp runs .cache .cache/torch && chmod 1777 runs
USER 1000:1000

ENTRYPOINT ["pfp-deploy"]
CMD ["--help"]
