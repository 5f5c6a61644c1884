# finetune-operator: `make setup` once, then `make test` or `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup test unit test-trainer integration e2e helm demo demo-down crd check-crd cluster-binaries images clean

setup: $(BIN)/finetune cluster-binaries  ## virtualenv with the package, and the embedded cluster's binaries

$(BIN)/finetune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch; the trainer image keeps its CUDA base image's own torch.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[trainer,dev]'
	touch $@

cluster-binaries: $(BIN)/finetune  ## build kube-apiserver & co once (about 5 minutes on 2 cores), cached in ~/.cache
	$(BIN)/python -m finetune_operator.cluster.build

test: $(BIN)/finetune  ## everything: unit, trainer, integration, e2e and Helm tests
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(BIN)/finetune
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-trainer: $(BIN)/finetune
	$(BIN)/pytest tests/trainer tests/unit/trainer $(PYTEST_ARGS)

integration: $(BIN)/finetune
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

e2e: $(BIN)/finetune
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

helm: $(BIN)/finetune
	$(BIN)/pytest tests/helm $(PYTEST_ARGS)

demo: setup  ## the whole path on an embedded cluster: install, train 2 workers, kill one, watch it recover
	$(BIN)/python -m finetune_operator.demo

demo-down:
	$(BIN)/finetune cluster down --dir .demo/cluster

crd: $(BIN)/finetune  ## regenerate crds/ and the chart's copy from the API models
	$(BIN)/finetune crd > crds/finetunejobs.finetune.dev.yaml

clean:
	rm -rf $(VENV) .demo .pytest_cache

docs: $(BIN)/finetune  ## regenerate the README's field table from the API models
	$(BIN)/python -m finetune_operator.docs
