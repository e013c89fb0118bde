package tpm_test

import (
	"testing"

	"github.com/hsmd/hsmd/tpm"
	"github.com/hsmd/hsmd/tpm/tpmtest"
)

// simSeed is the hierarchy seed of this process's simulator.
const simSeed = 0x6873_6d64

func simConfig(*testing.T) tpm.Config {
	c := tpmtest.SimulatorConfig(simSeed)
	c.NVIndex = freshNVIndex()
	return c
}

func swtpmConfig(t *testing.T) tpm.Config { return tpmtest.StartSwtpm(t).Config() }

func TestConformanceSimulator(t *testing.T) {
	runConformance(t, suite{newConfig: simConfig})
}

func TestConformanceSwtpm(t *testing.T) {
	runConformance(t, suite{newConfig: swtpmConfig, parallel: true})
}
