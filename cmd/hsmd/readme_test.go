package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestREADMEConfigExample: the configuration the README shows parses
// strictly and validates.
func TestREADMEConfigExample(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "```yaml\n")
	if !ok {
		t.Fatal("the README shows no YAML configuration")
	}
	yaml, _, _ := strings.Cut(rest, "```")
	path := filepath.Join(t.TempDir(), "hsmd.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	c.applyDefaults()
	if err := c.validate(false); err != nil {
		t.Fatalf("the README's configuration does not validate: %v", err)
	}
}
