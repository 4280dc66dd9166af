# The two commands of the README. Both create .venv on first use and install sslcli into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: install demo test clean docs-images

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	@bash scripts/demo.sh $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest

# The images in docs/ (an MAE reconstruction), regenerated from the embedded dataset: about 25 minutes on 2 CPU cores.
docs-images: install
	@bash scripts/docs_images.sh $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
