# One-command set-up: every target creates .venv when missing and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: test test-all demo data bench baseline clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[deploy,report,test]'
	touch $(STAMP)

# Real data: Debian's dataset-fashion-mnist (gzipped IDX files). Tests that need it skip without it.
data:
	@test -d $(FMNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist (needs root and Debian's package index)"

# One pytest worker per core (pytest-xdist); a test file stays on one worker, so its module fixtures
# are built once. TEST_WORKERS=0 runs everything in this process (for pdb, or one-core machines).
# One intra-op thread per worker (and per process a test starts): the tests are sized for it, and
# two workers with all-core thread pools each (torch, ONNX Runtime) slow each other down.
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) data
	$(PYTEST)

test-all: $(STAMP) data
	$(PYTEST) --runslow

# The main job: a real optimize run on Fashion-MNIST from the shipped trained ResNet-20 (prune, repair, fine-tune, export, gate).
demo: $(STAMP) data
	$(BIN)/pfp-deploy optimize --recipe recipes/fashion_mnist_quickstart.yaml --overwrite

# Retrain the shipped dense ResNet-20 (weights/resnet20_fashion_mnist.pt + its card), ~45 min on 2 cores.
baseline: $(STAMP) data
	$(BIN)/python -m benchmarks.train_baseline --threads 1 --epochs 15

bench: $(STAMP) data
	$(BIN)/python -m benchmarks.sensitivity_speed --arch resnet18
	$(BIN)/python -m benchmarks.sensitivity_speed --arch resnet50

clean:
	rm -rf $(VENV) build *.egg-info

# Container image with podman on a host without a registry: a local Debian base image (debootstrap,
# docker/build_base_image.sh, kept once made), then podman build with runc and this host's pip sources
# (docker/build_image.sh). Elsewhere: docker build -t pfp-deploy . (docs/docker.md).
DOCKER_IMAGE ?= localhost/pfp-deploy:latest
DOCKER_BASE ?= localhost/pfp-base:bookworm-py311
.PHONY: docker
docker:
	@case "$(DOCKER_BASE)" in localhost/pfp-base:*) docker/build_base_image.sh "$(DOCKER_BASE)" ;; esac
	IMAGE="$(DOCKER_IMAGE)" BASE_IMAGE="$(DOCKER_BASE)" docker/build_image.sh
