# The README's two commands. Each creates .venv on first use and installs
# what it needs, so both work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS := jax tensorflow torch
# pytest-xdist workers; a test file stays on one worker (its fixtures are
# built once). 2 matches the CI machine's cores.
PYTEST := $(BIN)/python -m pytest -q -n $${PYTEST_WORKERS:-2} --dist loadfile

.PHONY: pretrain test test-fast test-jax test-tensorflow test-torch clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all]"
	touch $@

# glibc malloc settings for CPU training: keep freed memory in the process
# rather than unmapping XLA's large per-step buffer and faulting it in again
# every step (README "Performance"; RESULTS.md "Throughput"). Other C
# libraries ignore these variables; unset them to use glibc's defaults.
HOST_MALLOC_ENV := MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1152921504606846976

# Main job: pretrain a small ViT on the bundled digits data, then its
# few-shot linear evaluation (tools/pretrain.py with no flags).
pretrain: $(VENV)/.installed
	$(HOST_MALLOC_ENV) KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(BIN)/python tools/pretrain.py

# Whole suite: unit tests on every backend, each backend in its own pytest
# process; integration tests of backend-neutral orchestration (tools, study,
# branches, distillation, multi-process: marked `integration`) run once, on
# JAX. Every backend runs even if one fails; the exit code is non-zero if any did.
test: $(VENV)/.installed
	@status=0; for backend in $(BACKENDS); do \
		echo "=== pytest on the $$backend backend ==="; \
		if [ $$backend = jax ]; then select=""; else select="not integration"; fi; \
		KERAS_BACKEND=$$backend $(PYTEST) -m "$$select" tests || status=1; \
	done; exit $$status

# Unit tests only, on one backend (KERAS_BACKEND, default jax): the quick loop.
test-fast: $(VENV)/.installed
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(PYTEST) -m "not integration" tests

test-%: $(VENV)/.installed
	KERAS_BACKEND=$* $(PYTEST) tests

clean:
	rm -rf $(VENV) build dist *.egg-info
