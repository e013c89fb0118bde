package tpm_test

import (
	"context"
	"testing"

	"github.com/hsmd/hsmd/tpm"
	"github.com/hsmd/hsmd/tpm/tpmtest"
)

func benchProviders(b *testing.B, fn func(*testing.B, *tpm.TPM)) {
	providers := map[string]func(*testing.B) tpm.Config{
		"swtpm": func(b *testing.B) tpm.Config { return tpmtest.StartSwtpm(b).Config() },
		"simulator": func(*testing.B) tpm.Config {
			c := tpmtest.SimulatorConfig(simSeed)
			c.NVIndex = freshNVIndex()
			return c
		},
	}
	for _, name := range []string{"swtpm", "simulator"} {
		b.Run(name, func(b *testing.B) { fn(b, openTPM(b, providers[name](b))) })
	}
}

func BenchmarkSeal(b *testing.B) {
	benchProviders(b, func(b *testing.B, tp *tpm.TPM) {
		secret := make([]byte, 32)
		for b.Loop() {
			if _, err := tp.Seal(context.Background(), secret); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkUnseal(b *testing.B) {
	benchProviders(b, func(b *testing.B, tp *tpm.TPM) {
		blob, err := tp.Seal(context.Background(), make([]byte, 32))
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, err := tp.Unseal(context.Background(), blob); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkIncrement(b *testing.B) {
	benchProviders(b, func(b *testing.B, tp *tpm.TPM) {
		if err := tp.DefineCounter(context.Background()); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, err := tp.IncrementCounter(context.Background()); err != nil {
				b.Fatal(err)
			}
		}
	})
}
