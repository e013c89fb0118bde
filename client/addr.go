package client

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// addr is a parsed server address.
type addr struct {
	network  string // "unix" or "tcp"
	address  string // socket path, or host:port
	loopback bool   // tcp only: host is localhost or a loopback IP
}

// parseAddr parses the address forms documented in the package doc.
func parseAddr(s string) (addr, error) {
	switch {
	case s == "":
		return addr{}, fmt.Errorf("hsmd client: empty address")
	case strings.HasPrefix(s, "unix://"):
		p := strings.TrimPrefix(s, "unix://")
		// An absolute path (unix:///abs), or a relative one spelt with a
		// leading ./ or ../ (unix://./rel). Anything else would be a URL
		// authority, which a unix socket cannot have.
		if !strings.HasPrefix(p, "/") && !strings.HasPrefix(p, "./") && !strings.HasPrefix(p, "../") {
			return addr{}, fmt.Errorf("hsmd client: address %q: use unix:///absolute/path or unix:relative/path", s)
		}
		return unixAddr(s, p)
	case strings.HasPrefix(s, "unix:"):
		return unixAddr(s, strings.TrimPrefix(s, "unix:"))
	case strings.Contains(s, "://"):
		return addr{}, fmt.Errorf("hsmd client: address %q: unsupported scheme (want unix://path, unix:path or host:port)", s)
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return addr{}, fmt.Errorf("hsmd client: address %q: want unix://path, unix:path or host:port", s)
	}
	if host == "" || port == "" {
		return addr{}, fmt.Errorf("hsmd client: address %q: host and port are both required", s)
	}
	return addr{network: "tcp", address: s, loopback: isLoopback(host)}, nil
}

func unixAddr(s, path string) (addr, error) {
	if path == "" || strings.ContainsRune(path, 0) {
		return addr{}, fmt.Errorf("hsmd client: address %q: bad socket path", s)
	}
	return addr{network: "unix", address: path}, nil
}

// isLoopback reports whether host is "localhost" or a loopback IP literal.
// Other names are not resolved: the decision must not depend on DNS.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}
