package hsm_test

import (
	"os"
	"syscall"
)

// dupFD returns a new descriptor for f that the HSM may read and close.
func dupFD(f *os.File) (int, error) { return syscall.Dup(int(f.Fd())) }
