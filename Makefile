# Set-up and entry points. `make demo` and `make test` are the README's two commands;
# both run `make install` first, which is idempotent.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The CPU build of torch; any torch >= 2.5 works with the package itself.
TORCH_PIN := torch==2.13.0

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...' with a Python >= 3.10" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

# Plans a small GPT and trains it on 4 local Ray CPU workers (about 2 minutes on 2 cores).
demo: install
	$(BIN)/python examples/train_gpt.py --cluster local:4 --steps 30

test: install
	$(BIN)/python -m pytest -q; status=$$?; echo $$status > $(VENV)/.pytest-status; exit $$status

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
