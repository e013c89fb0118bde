package tpm

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
)

// Providers accepted in Config.Provider.
const (
	ProviderDevice    = "device"    // a kernel TPM device, normally the resource manager /dev/tpmrm0
	ProviderSwtpm     = "swtpm"     // a swtpm socket server (development and tests)
	ProviderSimulator = "simulator" // the in-process go-tpm-tools simulator (development default; insecure)
	ProviderNone      = "none"      // no TPM: the caller decides what that means; Open refuses it
)

// Defaults applied by Open to zero-valued Config fields.
const (
	// DefaultDevice is the kernel's TPM resource manager. Prefer it to /dev/tpm0:
	// it flushes the objects of a process that dies, and lets several programs
	// share the TPM.
	DefaultDevice = "/dev/tpmrm0"

	// DefaultNVIndex is the NV index of the rollback counter. It lies in the
	// range the TCG handle registry gives to the TPM owner
	// (0x01000000-0x013FFFFF). The often-seen 0x01C1xxxx block is avoided: the
	// registry reserves it for component OEMs (Google Compute Engine keeps its
	// attestation-key certificates at 0x01C10000-0x01C10003).
	DefaultNVIndex uint32 = 0x01000110

	// MaxSecretSize is the largest secret Seal accepts: the TPM's
	// MAX_SYM_DATA, the limit of a sealed data object.
	MaxSecretSize = 128
)

// DefaultPCRs is the PCR policy used when Config.PCRs is empty: PCR 7, the
// Secure Boot state (SHA-256 bank).
var DefaultPCRs = []int{7}

// numPCRs is the number of PCRs of a PC-client TPM (0..23).
const numPCRs = 24

// Config selects and configures the TPM. It holds no secrets; it can be logged.
type Config struct {
	Provider string `yaml:"provider"` // "device", "swtpm", "simulator" or "none"
	Device   string `yaml:"device"`   // provider device: default DefaultDevice
	// Address of a swtpm server socket (provider swtpm): "unix:///abs/path/server.sock"
	// or "host:port" (TCP). Both carry the raw TPM command stream
	// (swtpm --server type=unixio or type=tcp).
	Address string `yaml:"address"`
	PCRs    []int  `yaml:"pcrs"`     // PCR policy (SHA-256 bank) for Seal; default DefaultPCRs
	NVIndex uint32 `yaml:"nv_index"` // the rollback counter's NV index; default DefaultNVIndex
	// SimulatorSeed seeds the simulator's hierarchies (provider simulator), so
	// that the SRK, and therefore sealed blobs, are the same in every process
	// started with the same seed. Not configurable from YAML: the development
	// profile keeps a random one in its data directory.
	SimulatorSeed int64 `yaml:"-"`
}

// Validate checks the configuration and names the YAML path (tpm.…) of the
// first problem it finds. A zero Device, PCRs or NVIndex is valid: Open
// applies the defaults.
func (c Config) Validate() error {
	switch c.Provider {
	case ProviderDevice:
		if c.Device != "" && !filepath.IsAbs(c.Device) {
			return fmt.Errorf("tpm.device must be an absolute path, got %q", c.Device)
		}
	case ProviderSwtpm:
		if c.Address == "" {
			return errors.New("tpm.address is required for swtpm")
		}
		if _, _, err := parseAddress(c.Address); err != nil {
			return err
		}
	case ProviderSimulator, ProviderNone:
	case "":
		return errors.New("tpm.provider is required: device, swtpm, simulator or none")
	default:
		return fmt.Errorf("tpm.provider must be device, swtpm, simulator or none, got %q", c.Provider)
	}
	return c.validatePolicy()
}

func (c Config) validatePolicy() error {
	seen := make(map[int]bool)
	for i, p := range c.PCRs {
		if p < 0 || p >= numPCRs {
			return fmt.Errorf("tpm.pcrs[%d] must be in the range 0..23, got %d", i, p)
		}
		if seen[p] {
			return fmt.Errorf("tpm.pcrs[%d]: PCR %d is listed twice", i, p)
		}
		seen[p] = true
	}
	if c.NVIndex != 0 && c.NVIndex>>24 != 0x01 {
		return fmt.Errorf("tpm.nv_index must be an NV index (0x01000000..0x01FFFFFF), got %#010x", c.NVIndex)
	}
	return nil
}

// withDefaults returns c with the documented defaults filled in and the PCR
// list sorted (a copy: the caller's slice is not modified).
func (c Config) withDefaults() Config {
	if c.Device == "" {
		c.Device = DefaultDevice
	}
	if len(c.PCRs) == 0 {
		c.PCRs = DefaultPCRs
	}
	c.PCRs = slices.Sorted(slices.Values(c.PCRs))
	if c.NVIndex == 0 {
		c.NVIndex = DefaultNVIndex
	}
	return c
}

// parseAddress turns a swtpm address into a network and an address for net.Dial.
func parseAddress(a string) (network, addr string, err error) {
	if path, ok := strings.CutPrefix(a, "unix://"); ok {
		if !filepath.IsAbs(path) {
			return "", "", fmt.Errorf("tpm.address: unix socket path must be absolute (unix:///abs/path), got %q", a)
		}
		return "unix", path, nil
	}
	if strings.Contains(a, "://") {
		return "", "", fmt.Errorf("tpm.address must be unix:///abs/path or host:port, got %q", a)
	}
	host, _, err := net.SplitHostPort(a)
	if err != nil {
		return "", "", fmt.Errorf("tpm.address must be unix:///abs/path or host:port, got %q", a)
	}
	// Seal and Unseal carry the secrets without parameter encryption: a
	// TCP hop beyond this machine would expose them.
	if ip, err := netip.ParseAddr(host); host != "localhost" && (err != nil || !ip.IsLoopback()) {
		return "", "", fmt.Errorf("tpm.address %q: swtpm over TCP is allowed on loopback only (the sealed secrets cross it in the clear); use a unix socket", a)
	}
	return "tcp", a, nil
}

// Info describes an open TPM. It holds no secrets.
type Info struct {
	Provider string
	Device   string // provider device
	Address  string // provider swtpm
	PCRs     []int  // the PCR policy of Seal (SHA-256 bank)
	NVIndex  uint32 // the rollback counter's NV index
}

// String formats the Info for logs.
func (i Info) String() string {
	where := ""
	switch i.Provider {
	case ProviderDevice:
		where = " device=" + i.Device
	case ProviderSwtpm:
		where = " address=" + i.Address
	}
	return fmt.Sprintf("provider=%s%s pcrs=%v nv_index=%#010x", i.Provider, where, i.PCRs, i.NVIndex)
}
