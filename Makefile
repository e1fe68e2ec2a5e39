# snaptier: the two commands a user needs are `make testbed` and `make test`.
SHELL := /bin/bash
TB := testbed/tb
BUILD := build/host
JOBS ?= 2

NATIVE := $(TB) -t testbed/topologies/native.toml
LIBVIRT := $(TB) -t testbed/topologies/libvirt.toml
TWO_MACHINES := $(TB) -t testbed/topologies/two-machines.toml

.PHONY: all deps build-deps build test test-unit test-python image guest-agent testbed up down status health scenario matrix chaos burst native native-matrix native-chaos native-down libvirt libvirt-down two-machines two-machines-down zdtm clean

all: build

deps:            ## install host packages (apt, bookworm-backports QEMU >= 10, mmdebstrap)
	bash ci/install-deps.sh

build-deps:      ## check the build dependencies (no root needed); install the missing ones as root
	bash ci/install-deps.sh --build

build: build-deps  ## build the agent, tests and benchmarks for this host
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
	cmake --build $(BUILD) -j$(JOBS)

test: build      ## unit tests: GoogleTest (ctest) and the testbed's Python tests
	cd $(BUILD) && ctest --output-on-failure --timeout 300 -j$(JOBS)
	/usr/bin/python3 -m pytest -q tests/testbed tests/workloads

image: deps      ## the Debian trixie guest image (cached; rebuilt when guests/ changes)
	bash guests/build-image.sh

guest-agent: image  ## the agent built inside the guest's trixie rootfs
	bash guests/build-agent.sh

testbed: deps image guest-agent  ## boot the default topology (or reuse it), health-check it, run the scenario
	@if $(TB) status > /dev/null 2>&1; then echo "testbed: topology already up and ready, reusing it"; \
	 else $(TB) down && $(TB) up; fi
	$(TB) status
	$(TB) health
	$(TB) scenario agent-smoke
	$(TB) matrix --functions helloworld --policies lazy-cxl,lazy-rdma,tiered

up: image
	$(TB) up
down:            ## stop the topology (idempotent)
	$(TB) down
status:
	$(TB) status
health:
	$(TB) health
matrix:          ## every function x every restore policy, host0 -> host1 (on the running topology)
	$(TB) matrix
chaos:           ## fault injection on the running topology, one promise per row (docs/testbed.md)
	$(TB) chaos
burst:           ## many instances of one snapshot restored at once on every host (on the running topology)
	$(TB) burst --function matmul --policies criu-eager,reap,tiered --instances 1,2,4

native: deps image guest-agent  ## the native topology (hosts as namespaces here): up (or reuse), health, scenario
	@if $(NATIVE) status > /dev/null 2>&1; then echo "native: topology already up and ready, reusing it"; \
	 else $(NATIVE) down && $(NATIVE) up; fi
	$(NATIVE) health
	$(NATIVE) scenario agent-smoke
native-matrix:   ## every function x every policy on the native topology (real-speed timings)
	$(NATIVE) matrix
native-chaos:    ## tb chaos on the native topology (rows needing the memory node are skipped)
	$(NATIVE) chaos
native-down:
	$(NATIVE) down

libvirt: deps image guest-agent  ## the default hosts as libvirt domains: daemon (if none runs), up (or reuse), health, scenario
	bash testbed/libvirt/daemon.sh start
	@if $(LIBVIRT) status > /dev/null 2>&1; then echo "libvirt: topology already up and ready, reusing it"; \
	 else $(LIBVIRT) down && $(LIBVIRT) up; fi
	$(LIBVIRT) health
	$(LIBVIRT) scenario agent-smoke
libvirt-down:
	$(LIBVIRT) down

two-machines: deps image guest-agent  ## the default hosts on two libvirt machines, the second over ssh on loopback: up (or reuse), health
	bash testbed/libvirt/daemon.sh start
	bash testbed/ssh/loopback.sh start
	@if $(TWO_MACHINES) status > /dev/null 2>&1; then echo "two-machines: topology already up and ready, reusing it"; \
	 else $(TWO_MACHINES) down && $(TWO_MACHINES) up; fi
	$(TWO_MACHINES) health
two-machines-down:
	$(TWO_MACHINES) down

zdtm: deps image guest-agent  ## CRIU's zdtm suite, lazy pages: CRIU's daemon vs the agent's (docs/zdtm.md)
	bash tests/zdtm/zdtm.sh

clean:
	rm -rf build
