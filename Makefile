# finetune-operator: `make setup` once, then `make test` or `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup debian-packages disk checkov lint test unit test-trainer integration e2e helm demo demo-down crd check-chart cluster-binaries images clean docs

setup: debian-packages $(BIN)/finetune cluster-binaries checkov  ## Debian packages, virtualenv with the package, the embedded cluster's binaries, checkov

# What the cluster, its node, the images and the tests need from Debian (root; else one line naming them).
debian-packages:
	@$(PYTHON) dev/finetune_dev/debian.py

# The embedded cluster's runs need room (images, etcd, checkpoints): say so before the tests time out.
disk: $(BIN)/finetune
	@$(BIN)/python -m finetune_dev.cluster.disk

# Everything at the versions of constraints.txt, the lock both images install from too.
$(BIN)/finetune: pyproject.toml dev/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The lock's torch, first: the CPU build where pip finds it (find-links), as the tests' trainer image has.
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[operator,trainer,dev]' -e dev/
	touch $@

# checkov pins much of its own, so it lives apart; tests/helm/test_checkov.py finds it here.
CHECKOV_VERSION ?= 3.3.30
checkov: .venv-checkov/bin/checkov
.venv-checkov/bin/checkov:
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet checkov==$(CHECKOV_VERSION)

cluster-binaries: $(BIN)/finetune  ## build kube-apiserver & co and the kubelet once (about 10 minutes on 2 cores), cached in ~/.cache
	$(BIN)/python -m finetune_dev.cluster.build

test: debian-packages lint disk  ## lint and types, then everything: unit, trainer, integration, e2e and Helm tests
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(BIN)/finetune  ## ruff (lint and format) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(BIN)/finetune
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-trainer: $(BIN)/finetune
	$(BIN)/pytest tests/trainer tests/unit/trainer $(PYTEST_ARGS)

integration: $(BIN)/finetune
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

e2e: debian-packages disk
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

helm: $(BIN)/finetune
	$(BIN)/pytest tests/helm $(PYTEST_ARGS)

demo: setup  ## the whole path on an embedded cluster: install, train 2 workers, kill one, watch it recover
	$(BIN)/python -m finetune_dev.demo

demo-down:
	$(BIN)/finetune cluster down --dir .demo/cluster

IMAGE_REGISTRY ?= ghcr.io/finetune-operator
# The trainer's torch build: cuda (PyPI's wheels, for GPU clusters) or cpu (e.g. with
# `--build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu` in DOCKER_BUILD_ARGS).
TORCH_VARIANT ?= cuda
DOCKER_BUILD_ARGS ?=
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/finetune-operator/Chart.yaml)

crd: $(BIN)/finetune  ## regenerate crds/, the chart's copy and the README tables from the API models
	$(BIN)/finetune crd > crds/finetunejobs.finetune.dev.yaml
	$(BIN)/python -m finetune_dev.chart_sync
	$(BIN)/python -m finetune_dev.docs

check-chart: $(BIN)/finetune  ## fail if the chart's CRD copy or values table is stale
	$(BIN)/python -m finetune_dev.chart_sync --check

images:  ## build the operator and trainer images: with Docker if running, else debootstrap + buildah (root)
	@if docker info >/dev/null 2>&1; then \
	  set -x; \
	  docker build $(DOCKER_BUILD_ARGS) -f operator/Dockerfile -t $(IMAGE_REGISTRY)/operator:$(IMAGE_TAG) . && \
	  docker build $(DOCKER_BUILD_ARGS) -f trainer/Dockerfile --build-arg TORCH_VARIANT=$(TORCH_VARIANT) \
	    -t $(IMAGE_REGISTRY)/trainer:$(IMAGE_TAG) .; \
	else \
	  echo "no Docker engine: building with debootstrap and buildah (CPU torch), cached in ~/.cache/finetune-operator/images"; \
	  $(BIN)/python -m finetune_dev.images; \
	fi

clean:
	rm -rf $(VENV) .demo .pytest_cache

docs: $(BIN)/finetune  ## regenerate the README's field table from the API models
	$(BIN)/python -m finetune_dev.docs
