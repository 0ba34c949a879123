# make setup: build the stack into .venv (idempotent); make train: the default experiment on
# NP processes; make test: the whole suite. BUILD.md explains the build.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
NP ?= 2
EXPERIMENT ?= digits_cnn

.PHONY: setup train test clean

setup:
	@bash scripts/bootstrap.sh

train: setup
	$(PYTHON) -m app.launch -np $(NP) --flagfile=configs/$(EXPERIMENT).cfg

test: setup
	$(PYTHON) -m pytest

clean:
	rm -rf runs .pytest_cache
