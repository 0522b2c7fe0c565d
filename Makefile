# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtual environment on first use and reinstalls when pyproject.toml changes.
# `make docs` builds the documentation site into site/ (MkDocs, --strict: a broken link fails).
# The Python that makes the venv: python3 by default, any other with `make PYTHON=python3.12`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data demo bootstrap-demo test lint docs clean

# One line, before any venv is made, when $(PYTHON) is older than pyproject's requires-python
# (read with a regular expression: Python 3.10 has no tomllib; %-formatting: old Pythons too).
define CHECK_PYTHON
import re, sys
need = re.search(r'requires-python *= *">= *([0-9.]+)"', open("pyproject.toml").read()).group(1)
if sys.version_info[:2] < tuple(int(n) for n in need.split(".")):
    sys.exit("make: %s is Python %d.%d; sparseformer needs Python %s or newer (requires-python "
             "in pyproject.toml): install one and run make PYTHON=python3.X"
             % (sys.executable, sys.version_info[0], sys.version_info[1], need))
endef
export CHECK_PYTHON

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { $(PYTHON) -c "$$CHECK_PYTHON" && $(PYTHON) -m venv $(VENV); }
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

# A ViT teacher trained on Fashion-MNIST, a SparseFormer bootstrapped from it, one table of both
bootstrap-demo: setup data
	$(BIN)/python scripts/bootstrap_demo.py --out runs/bootstrap-demo

test: setup data
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The docs tools live in the same venv but install only here, so `make test` stays as fast.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info
