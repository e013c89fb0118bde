package main

import (
	"strings"
	"testing"
)

// TestTLSClientCANeedsTLS: tls.client_ca_file without a certificate is
// refused, naming its YAML path.
func TestTLSClientCANeedsTLS(t *testing.T) {
	tc := TLSConfig{ClientCAFile: "ca.pem"}
	if err := tc.validate(); err == nil || !strings.Contains(err.Error(), "tls.client_ca_file") {
		t.Errorf("validate: %v, want an error naming tls.client_ca_file", err)
	}
	tc.CertFile, tc.KeyFile = "cert.pem", "key.pem"
	if err := tc.validate(); err != nil {
		t.Error(err)
	}
}
