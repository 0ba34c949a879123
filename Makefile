# make setup: build the stack into .venv (idempotent); make train: the default experiment on
# NP processes; make test: the whole suite; make test-fast: the tests that start no MPI,
# horovodrun or SLURM job, for quick feedback; make tensorboard: TensorBoard on LOGDIR,
# reachable from this machine only (from elsewhere: an ssh tunnel); make flags-page: writes
# docs/flags.md from the flags' definitions. BUILD.md explains the build.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
NP ?= 2
EXPERIMENT ?= digits_cnn
LOGDIR ?= runs
PORT ?= 6006

.PHONY: setup train test test-fast tensorboard flags-page clean

setup:
	@bash scripts/bootstrap.sh

train: setup
	$(PYTHON) -m app.launch -np $(NP) --flagfile=configs/$(EXPERIMENT).cfg

test:
	@bash scripts/bootstrap.sh --test
	$(PYTHON) -m pytest

test-fast: setup
	$(PYTHON) -m pytest -m "not distributed"

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host localhost --port $(PORT)

flags-page: setup
	$(PYTHON) -c "from app import flags; print(flags.reference_page(), end='')" > docs/flags.md

clean:
	rm -rf runs .pytest_cache
