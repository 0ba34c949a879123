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

# The tests that start no MPI job run two at a time (much of each is tracing on one core), a
# file's tests on one worker (its module fixtures made once); the distributed ones one at a
# time, their ranks busy-polling both cores. Both parts run before the exit says either failed.
test:
	@bash scripts/bootstrap.sh --test
	$(PYTHON) -m pytest -m "not distributed" -n 2 --dist loadfile; one=$$?; \
	$(PYTHON) -m pytest -m distributed; two=$$?; exit $$(( one ? one : two ))

test-fast: setup
	$(PYTHON) -m pytest -m "not distributed" -n 2 --dist loadfile

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host localhost --port $(PORT)

flags-page: setup
	$(PYTHON) -c "from app import flags; print(flags.reference_page(), end='')" > docs/flags.md

clean:
	rm -rf runs .pytest_cache
