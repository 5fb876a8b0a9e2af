# Ambit: `make demo` and `make test` install whatever a fresh Debian machine lacks, then do their job.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bootstrapped
PROTOS := $(shell find agent hbone -name '*.proto' 2>/dev/null)
PB2    := $(PROTOS:.proto=_pb2.py)

.PHONY: setup demo test lint typecheck unit e2e bench clean image kind-deploy minikube-deploy undeploy
.DEFAULT_GOAL := test

setup: $(STAMP) $(PB2)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh
	touch $@

# grpc_tools adds its bundled google/protobuf/*.proto to the include path itself. The sed gives the bare
# `Mapping` that protoc writes for message-typed fields (e.g. google.protobuf.Struct) its type arguments,
# so that strict mypy accepts the generated .pyi.
%_pb2.py: %.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $<
	sed -i 's/\b_Mapping\]/_Mapping[str, object]]/g' $(<:.proto=_pb2.pyi)

demo: setup
	$(PY) -m agent.cli.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# tests/README.md: unit and integration tests need no root (under a minute); e2e tests need root, bcc and labs.
unit: setup
	$(PY) -m pytest -q tests/unit tests/integration

e2e: setup
	$(PY) -m pytest -q tests/e2e

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench
	$(PY) -m bench.policy
	$(PY) -m bench.flows
	$(PY) -m bench.enforcement
	$(PY) -m bench.observability
	$(PY) -m bench.conn_memory
	$(PY) -m bench.store

# A bounded fuzz campaign against the HBONE protocol layer and server (tests/fuzz): 1,000,000 protocol inputs
# (atheris) and 20,000 hostile socket sessions against `ambit hbone serve`; FUZZ_ARGS=--inputs N --sessions M.
.PHONY: fuzz
fuzz: setup
	$(PY) -m tests.fuzz.hbone_campaign $(FUZZ_ARGS)

# Kubernetes (daemonset/README.md): the image, and Ambit on a kind or minikube cluster. Settings such as
# IMAGE=, KIND_CLUSTER=, MINIKUBE_PROFILE=, KUBE_CONTEXT= pass through to daemonset/deploy.sh.
image kind-deploy minikube-deploy undeploy:
	daemonset/deploy.sh $@

clean:
	rm -rf $(VENV) $(PB2) $(PB2:_pb2.py=_pb2.pyi) $(PB2:_pb2.py=_pb2_grpc.py) .mypy_cache .ruff_cache .pytest_cache
