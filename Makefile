# `make demo` and `make test` set everything up from scratch (idempotently) and then run.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install -q --disable-pip-version-check
STAMP   := $(VENV)/.installed
PROTOS  := $(wildcard proto/customdiffusion/v1/*.proto)
GEN     := proto/gen/customdiffusion/v1/.stamp

.PHONY: install proto test demo lint clean

install: $(STAMP) $(GEN)

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

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/customdiff demo --out demo-output

lint: install
	cd proto && ../$(VENV)/bin/buf lint

clean:
	rm -rf $(VENV) proto/gen demo-output
