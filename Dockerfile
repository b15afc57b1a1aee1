# pfp-deploy, CPU image: optimize, export and benchmark on any x86-64 / arm64 Linux host.
#
#   docker build -t pfp-deploy .
#   docker run --rm --user "$(id -u):$(id -g)" \
#     -v /data/fashion-mnist:/usr/share/datasets/fashion-mnist:ro \
#     -v $PWD/runs:/work/runs \
#     pfp-deploy optimize --recipe recipes/fashion_mnist_quickstart.yaml
#
# --user lets the container write into your ./runs (the image's own user is the non-root "pfp").
# Your own recipes: mount them too (-v $PWD/my.yaml:/work/my.yaml:ro ... --recipe my.yaml).
# Torchvision weights are never downloaded: mount the torch hub cache for tagged weights, e.g.
#   -v ~/.cache/torch:/work/.cache/torch:ro
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    TORCH_HOME=/work/.cache/torch

# Installed the way the README does it: torch first, then the project with its deploy and report
# extras. Torch comes from PyTorch's CPU wheel index: the default PyPI wheel bundles CUDA (~2.5 GB)
# that a CPU image never uses. "2.14.1+cpu" satisfies the project's torch==2.14.1 pin, so the
# second step keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pfp_deploy ./pfp_deploy
RUN pip install '.[deploy,report]' && rm -rf /src

RUN useradd --create-home --uid 1000 pfp
WORKDIR /work
COPY recipes ./recipes
RUN mkdir -p runs .cache && chown -R pfp:pfp /work
USER pfp

ENTRYPOINT ["pfp-deploy"]
CMD ["--help"]
