# hsmd build. GNU make; recipes run in bash with -euo pipefail.
#
#   make deps        install missing system packages (apt-get when root) and tools
#   make build       build bin/hsmd
#   make run         run a development server: ./bin/hsmd serve --dev --data-dir ./var
#   make test        vet, staticcheck and all tests (what CI runs: .ci/run)
#   make proto       regenerate api/ from its .proto files
#   make proto-check check that the committed generated code is reproducible
#   make bench       run benchmarks
#   make fuzz        run every fuzz target (of FUZZ_PKGS) for FUZZTIME (default 30s) each
#   make faults      HSM fault injection under load for FAULT_DURATION (default 5m;
#                    HSMD_FAULT_SEED=N replays a run's random faults)
#   make soak        soak test at full load for DURATION (default 10m), failing on growth
#   make crash       CRASH_ROUNDS (default 50) rounds of SIGKILL under mixed load, checked after each
#   make clean       remove bin/ and .bin/ (make clean-var also removes ./var)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build
.DELETE_ON_ERROR:

GO ?= go
# Project-local tools, installed by `go install` with GOBIN.
TOOLS_BIN := $(CURDIR)/.bin

# Debian packages the tests and the dev server need. (etcd is not one: the cluster
# tests run etcd's embed package at the client's version, avoiding Debian's 3.4.)
PKGS := softhsm2 swtpm swtpm-tools
# Debian packages `make proto` needs.
PROTO_PKGS := protobuf-compiler

STATICCHECK_VERSION := v0.8.2
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2

# Stamps named after the version, so changing a version reinstalls the tool.
STATICCHECK := $(TOOLS_BIN)/.staticcheck-$(STATICCHECK_VERSION)
PROTOC_GEN_GO := $(TOOLS_BIN)/.protoc-gen-go-$(PROTOC_GEN_GO_VERSION)
PROTOC_GEN_GO_GRPC := $(TOOLS_BIN)/.protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)

PROTO_FILES := api/hsmd/v1/hsmd.proto
PROTOC_FLAGS := --go_opt=paths=source_relative --go-grpc_opt=paths=source_relative

FUZZTIME ?= 30s
FUZZ_PKGS ?= ./...
FAULT_DURATION ?= 5m
DURATION ?= 10m
CRASH_ROUNDS ?= 50
# go test's own deadline for the long runs of faults and soak.
LONG_TIMEOUT ?= 3h
BENCH ?= .

# apt_ensure installs the Debian packages in $(1) that are not installed: with
# apt-get when running as root, otherwise it prints the command and fails.
define apt_ensure
missing=""; \
for p in $(1); do \
	dpkg -s "$$p" 2>/dev/null | grep -qx 'Status: install ok installed' || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
	if [ "$$(id -u)" -eq 0 ]; then \
		echo "installing system packages:$$missing"; \
		apt-get update; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	else \
		echo "missing system packages:$$missing" >&2; \
		echo "install them with: sudo apt-get install -y$$missing" >&2; \
		exit 1; \
	fi; \
fi
endef

.PHONY: deps system-deps tools build run test proto proto-tools proto-check bench fuzz faults soak crash clean clean-var

deps: system-deps tools

system-deps:
	@$(call apt_ensure,$(PKGS))

tools: $(STATICCHECK)

$(STATICCHECK):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	touch $@

build:
	$(GO) build -o bin/hsmd ./cmd/hsmd

# The dev server listens on ./var/hsmd.sock, the CLI's default --addr.
# DATA_DIR and RUN_FLAGS (e.g. --listen-tcp 127.0.0.1:0) exist for the
# end-to-end test that drives this target.
DATA_DIR ?= ./var
RUN_FLAGS ?=
run: system-deps build
	mkdir -p -m 0700 $(DATA_DIR)
	exec ./bin/hsmd serve --dev --data-dir $(DATA_DIR) $(RUN_FLAGS)

test: deps
	$(GO) vet ./...
	$(TOOLS_BIN)/staticcheck ./...
	$(GO) test -race -count=1 -timeout 20m ./...

proto-tools: $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	@$(call apt_ensure,$(PROTO_PKGS))

$(PROTOC_GEN_GO):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	touch $@

$(PROTOC_GEN_GO_GRPC):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	touch $@

# The committed code was made by protoc 3.21.12 (Debian bookworm's); another
# protoc version changes the version comment in the generated files.
proto: proto-tools
	PATH="$(TOOLS_BIN):$$PATH" protoc --go_out=. --go-grpc_out=. $(PROTOC_FLAGS) $(PROTO_FILES)

# Regenerates into a temporary directory and compares with the committed files,
# so it works on uncommitted trees too and leaves the work tree alone.
proto-check: proto-tools
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	PATH="$(TOOLS_BIN):$$PATH" protoc --go_out="$$tmp" --go-grpc_out="$$tmp" $(PROTOC_FLAGS) $(PROTO_FILES); \
	status=0; \
	for f in $$(cd "$$tmp" && find . -name '*.pb.go' | sort); do \
		diff -u "$$f" "$$tmp/$$f" || status=1; \
	done; \
	if [ "$$status" -ne 0 ]; then echo "generated code is stale or not reproducible: run make proto" >&2; fi; \
	exit $$status

bench:
	$(GO) test -run '^$$' -bench '$(BENCH)' -benchmem ./...

# Fuzz targets are found with `go test -list`; -fuzz takes one package and one target at a time.
fuzz:
	for pkg in $$($(GO) list $(FUZZ_PKGS)); do \
		targets=$$($(GO) test -list '^Fuzz' "$$pkg" | grep '^Fuzz' || true); \
		for t in $$targets; do \
			echo "== $$pkg $$t ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) "$$pkg"; \
		done; \
	done

# The long form of TestHSMFaultsUnderLoad (server/hsmfault_test.go): rounds of
# random retryable faults and fatal bursts under load until FAULT_DURATION.
faults: system-deps
	HSMD_FAULT_DURATION=$(FAULT_DURATION) $(GO) test -race -count=1 -v -timeout $(LONG_TIMEOUT) \
		-run '^TestHSMFaultsUnderLoad$$' ./server

# The long form of TestSoak (soak/): full load for DURATION, without the race
# detector so that RSS and throughput are the real ones.
soak: system-deps
	HSMD_SOAK_DURATION=$(DURATION) $(GO) test -count=1 -v -timeout $(LONG_TIMEOUT) -run '^TestSoak$$' ./soak

# The long form of TestCrashLoop (cmd/hsmd/crashloop_test.go); HSMD_CRASH_SEED=N
# replays a run.
crash: system-deps
	HSMD_CRASH_ROUNDS=$(CRASH_ROUNDS) $(GO) test -race -count=1 -v -timeout $(LONG_TIMEOUT) \
		-run '^TestCrashLoop$$' ./cmd/hsmd

clean:
	rm -rf bin .bin

# var/ holds the dev server's tokens and keys: removing it destroys them.
clean-var:
	rm -rf var
