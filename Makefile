# fedsecmem: two commands for a new user: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/quickstart

.PHONY: run test bench setup system clean proto

# Debian packages the tests read: Fashion-MNIST (a benchmark's data) and Chromium (renders the
# privacy report in a test). Installed when root; otherwise one line says the command to type.
SYSTEM_PACKAGES := dataset-fashion-mnist chromium

setup: $(STAMP)

system:
	@missing=""; \
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing; run: sudo apt-get update && sudo apt-get install -y$$missing" >&2; \
	    exit 2; \
	  fi; \
	fi

# Installs once; re-runs only when pyproject.toml changes (offline afterwards).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test,data,ray,export]'
	touch $(STAMP)

# The main job: private, secure FedDyMem on the embedded textures benchmark, beside the same
# without DP and the two references; then the private run's ledgers are verified and its privacy
# report (membership inference included) written; last, site 0 scores a few of its held-out test
# images with the model it kept (a decision per image, overlays in RUN_DIR/predictions).
run: $(STAMP)
	$(VENV)/bin/fedsecmem run configs/quickstart.yaml --out $(RUN_DIR)/feddymem_dp
	$(VENV)/bin/fedsecmem run configs/quickstart.yaml --out $(RUN_DIR)/feddymem --set privacy.dp=false \
		--set feddymem.global_k=512 --set feddymem.global_k_images=64
	$(VENV)/bin/fedsecmem run configs/quickstart.yaml --out $(RUN_DIR)/local --set method=local
	$(VENV)/bin/fedsecmem run configs/quickstart.yaml --out $(RUN_DIR)/central --set method=central
	$(VENV)/bin/fedsecmem table $(RUN_DIR)/feddymem_dp $(RUN_DIR)/feddymem $(RUN_DIR)/local $(RUN_DIR)/central
	$(VENV)/bin/fedsecmem audit verify $(RUN_DIR)/feddymem_dp
	$(VENV)/bin/fedsecmem audit report $(RUN_DIR)/feddymem_dp --compare $(RUN_DIR)/local --compare $(RUN_DIR)/feddymem
	$(VENV)/bin/fedsecmem audit check $(RUN_DIR)/feddymem_dp/report.json
	$(VENV)/bin/fedsecmem samples configs/quickstart.yaml --client 0 --n 6 --out $(RUN_DIR)/samples
	$(VENV)/bin/fedsecmem predict $(RUN_DIR)/feddymem_dp/models/client-0 $(RUN_DIR)/samples --out $(RUN_DIR)/predictions

test: system $(STAMP)
	$(PY) -m pytest -q

# The benchmarks also need anomalib (the parity reference, `bench` extra), installed once.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[test,data,bench,ray,export]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf runs .pytest_cache

# Regenerates protocols/federation_pb2*.py from protocols/federation.proto (grpcio-tools, test extra).
proto: $(STAMP)
	rm -rf build/proto && mkdir -p build/proto/fedsecmem/protocols
	cp protocols/federation.proto build/proto/fedsecmem/protocols/
	$(PY) -m grpc_tools.protoc -I build/proto --python_out=build/proto --pyi_out=build/proto \
		--grpc_python_out=build/proto build/proto/fedsecmem/protocols/federation.proto
	cp build/proto/fedsecmem/protocols/federation_pb2*.py* protocols/
