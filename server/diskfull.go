package server

import (
	"errors"
	"strings"
	"syscall"
)

// msgDiskFull is what a call refused for want of disk space says.
const msgDiskFull = "the data directory's disk is full (no space left on device)"

// isDiskFull reports whether err comes from a full disk or an exhausted
// quota, anywhere under the data directory (store, audit log). The audit
// log passes its writer's errors on as text, so the text counts too.
func isDiskFull(err error) bool {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, syscall.ENOSPC.Error()) || strings.Contains(msg, syscall.EDQUOT.Error())
}
