package tpm_test

import (
	"context"
	"strings"
	"testing"

	"github.com/hsmd/hsmd/tpm"
)

func TestConfigValidate(t *testing.T) {
	valid := []tpm.Config{
		{Provider: "device"},
		{Provider: "device", Device: "/dev/tpm0", PCRs: []int{0, 7, 23}, NVIndex: 0x01000001},
		{Provider: "swtpm", Address: "unix:///run/swtpm/server.sock"},
		{Provider: "swtpm", Address: "127.0.0.1:2321"},
		{Provider: "simulator"},
		{Provider: "none"},
	}
	for _, c := range valid {
		if err := c.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v, want nil", c, err)
		}
	}
	invalid := []struct {
		c    tpm.Config
		want string
	}{
		{tpm.Config{}, "tpm.provider is required"},
		{tpm.Config{Provider: "hardware"}, "tpm.provider must be device, swtpm, simulator or none"},
		{tpm.Config{Provider: "device", Device: "tpmrm0"}, "tpm.device must be an absolute path"},
		{tpm.Config{Provider: "swtpm"}, "tpm.address is required for swtpm"},
		{tpm.Config{Provider: "swtpm", Address: "unix://relative.sock"}, "tpm.address"},
		{tpm.Config{Provider: "swtpm", Address: "http://host:1"}, "tpm.address"},
		{tpm.Config{Provider: "swtpm", Address: "localhost"}, "tpm.address"},
		{tpm.Config{Provider: "simulator", PCRs: []int{24}}, "tpm.pcrs[0] must be in the range 0..23"},
		{tpm.Config{Provider: "simulator", PCRs: []int{-1}}, "tpm.pcrs[0]"},
		{tpm.Config{Provider: "simulator", PCRs: []int{7, 7}}, "tpm.pcrs[1]"},
		{tpm.Config{Provider: "simulator", NVIndex: 0x81000001}, "tpm.nv_index"},
	}
	for _, tc := range invalid {
		err := tc.c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%+v) = %v, want an error containing %q", tc.c, err, tc.want)
		}
	}
}

func TestOpenRefusesNone(t *testing.T) {
	if tp, err := tpm.Open(context.Background(), tpm.Config{Provider: "none"}); err == nil {
		tp.Close()
		t.Fatal("Open with provider none succeeded")
	}
	if _, err := tpm.Open(context.Background(), tpm.Config{Provider: "bogus"}); err == nil {
		t.Fatal("Open of an invalid config succeeded")
	}
}
