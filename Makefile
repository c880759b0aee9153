# The README's two commands. Each creates .venv on first use and installs
# what it needs, so both work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS := jax tensorflow torch

.PHONY: pretrain test test-jax test-tensorflow test-torch clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all]"
	touch $@

# Main job: pretrain a small ViT on the bundled digits data, then its
# few-shot linear evaluation (tools/pretrain.py with no flags).
pretrain: $(VENV)/.installed
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(BIN)/python tools/pretrain.py

# Whole suite, once per Keras backend, each in its own pytest process.
# Every backend runs even if one fails; the exit code is non-zero if any did.
test: $(VENV)/.installed
	@status=0; for backend in $(BACKENDS); do \
		echo "=== pytest on the $$backend backend ==="; \
		KERAS_BACKEND=$$backend $(BIN)/python -m pytest -q tests || status=1; \
	done; exit $$status

test-%: $(VENV)/.installed
	KERAS_BACKEND=$* $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build dist *.egg-info
