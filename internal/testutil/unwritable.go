package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// MakeUnwritable makes every directory under dir (dir included)
// unwritable: immutable (chattr +i) when the test runs as root, whom modes
// do not stop, else mode 0500. The returned function undoes it (it also
// runs at cleanup). It fails the test if it cannot.
func MakeUnwritable(t testing.TB, dir string) (undo func()) {
	t.Helper()
	var dirs []string
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	set := func(on bool) {
		for _, d := range dirs {
			var err error
			if os.Geteuid() == 0 {
				flag := "-i"
				if on {
					flag = "+i"
				}
				if out, cerr := exec.Command("chattr", flag, d).CombinedOutput(); cerr != nil {
					t.Errorf("chattr %s %s: %v: %s (the filesystem of the test's temp dir must support immutable directories)", flag, d, cerr, out)
				}
				continue
			}
			mode := os.FileMode(0o700)
			if on {
				mode = 0o500
			}
			if err = os.Chmod(d, mode); err != nil {
				t.Errorf("chmod %s: %v", d, err)
			}
		}
	}
	set(true)
	if t.Failed() {
		set(false)
		t.FailNow()
	}
	var once sync.Once
	undo = func() { once.Do(func() { set(false) }) }
	t.Cleanup(undo)
	return undo
}
