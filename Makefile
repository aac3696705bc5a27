# Two entry points (README.md): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of this torch lies on our machines' disk; override on a GPU box, e.g.
# `make setup TORCH_SPEC='torch==2.11.0'`.
TORCH_SPEC ?= torch==2.13.0
# The lent GPU machine runs Triton 3.6.0 (DESIGN §9): CI tests the same Triton in its interpreter
# (and tools/compile_fused_sm90.py compiles with its ptxas).
TRITON_SPEC ?= triton==3.6.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-gpu demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	@# SLURM and munge for tests/slurm (needs root; without them those tests skip and say why)
	-bash tools/ci_setup_slurm.sh
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# On a machine with a CUDA GPU (the lent device): the GPU suite.
test-gpu:
	$(PYTHON) -m pytest -q tests/gpu $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node 1 launch/pretrain.py

clean:
	rm -rf $(VENV) runs
