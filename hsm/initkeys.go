package hsm

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"
)

// keyCreation serialises changes of the root keys in the process: SoftHSM
// 2.6.1 fails now and then when keys are generated concurrently, and a
// check that a label is free must hold until the key is made.
var keyCreation sync.Mutex

// InitKeys creates the root keys on a token that has no hsmd key yet
// (`hsmd init`): hsmd/kdk/v1 (HMAC-SHA256 generic secret, 32 bytes),
// hsmd/wrap/v1 (AES-256), hsmd/sig-p256/v1 (ECDSA P-256) and
// hsmd/sig-ed25519/v1 (Ed25519), all generated inside the HSM as
// persistent, private, sensitive, non-extractable keys. It checks each
// (HMAC consistency, AES-GCM round trip, sign and verify with the public
// key read from the token). It is CreateRoots(ctx, 1) on an empty token.
//
// If any object labelled "hsmd/..." exists it returns ErrKeysExist and
// changes nothing. If creation or a check fails it destroys the keys it
// created (best effort) and returns the error. Key creation is serialised
// within the process. On success the keys are loaded as by LoadKeys.
func (h *HSM) InitKeys(ctx context.Context) error {
	keyCreation.Lock()
	defer keyCreation.Unlock()
	if err := h.checkNoKeys(ctx); err != nil {
		return err
	}
	return h.createRoots(ctx, "init keys", 1, rootKinds)
}

// checkNoKeys fails with ErrKeysExist if any object has an hsmd label.
func (h *HSM) checkNoKeys(ctx context.Context) error {
	var found []string
	err := h.do(ctx, "init keys", func(m Module, s pkcs11.SessionHandle) error {
		hs, err := findObjects(m, s, nil)
		if err != nil {
			return err
		}
		for _, o := range hs {
			label, err := objectLabel(m, s, o)
			if err != nil {
				return err
			}
			if strings.HasPrefix(label, labelPrefix) {
				found = append(found, label)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(found) > 0 {
		sort.Strings(found)
		return fmt.Errorf("%w: found %s", ErrKeysExist, strings.Join(found, ", "))
	}
	return nil
}

// destroy removes the given objects, found in generation gen, continuing
// past failures. After a recovery it destroys nothing (the handles may
// name other objects now) and fails with a retryable error.
func (h *HSM) destroy(ctx context.Context, gen uint64, objs []pkcs11.ObjectHandle) error {
	var errs []error
	for _, o := range objs {
		errs = append(errs, h.doAt(ctx, "destroy key", gen, func(m Module, s pkcs11.SessionHandle) error {
			return m.DestroyObject(s, o)
		}))
	}
	return errors.Join(errs...)
}
