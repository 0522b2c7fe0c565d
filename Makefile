# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtual environment on first use and reinstalls when pyproject.toml changes.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data demo test lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST for the demo and the training tests: the Debian package where apt exists (CI and
# this machine run as root); elsewhere torchvision downloads it on first use when online.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
data:
	@test -d $(FASHION_MNIST) || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
		echo "could not install dataset-fashion-mnist; it will be downloaded when online"

demo: setup data
	$(BIN)/sparseformer demo

test: setup data
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
