# Two entry points (see README): `make demo` and `make test`. Both set everything up first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Build caches (DeepSpeed's JIT ops) stay inside the project's ignored folders.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps demo test clean

setup: $(STAMP)

# torch first and pinned: this exact spec takes the CPU build on disk; anything looser pulls CUDA wheels.
# The editable install runs with warnings off: setuptools prints a multi-line note about same-named folders.
$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements/lock.txt
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/e2e-dist train tiny-text --set name=demo

# System packages some tests need (sshd + rsync for `ray up` over SSH, espeak-ng for the spoken
# corpus, fonts for the rendered digits). Idempotent; needs root or sudo, as in CI. Without them
# those tests skip and say why (digits then render from matplotlib's few fonts).
system-deps:
	-bash .ci/install-system-deps.sh
	-bash .ci/install-speech-deps.sh
	-bash .ci/install-font-deps.sh

test: setup system-deps
	$(BIN)/python -m pytest tests -q

clean:
	rm -rf $(VENV) .cache runs
