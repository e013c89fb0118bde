package hsm

import (
	"context"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/miekg/pkcs11"
)

// Root key ceremonies: ImportRoots and CreateRoots add a version of some
// root key kinds, DestroyRoot removes one, RootVersions lists them. All of
// them are serialised within the process (keyCreation), and each change
// refreshes the keys this HSM has loaded, so that NewestKDK, PRF, Signer
// and WrapSeal/WrapOpen see it at once. Other HSMs (and processes) on the
// token see it after their next LoadKeys.

// ImportRoots creates, from m, the keys of kinds (all four if none is
// given: KindKDK, KindWrap, KindSigP256, KindSigEd25519) at version,
// labelled KeyLabel(kind, version), with the same attributes as generated
// keys (persistent, private, sensitive, not extractable, not modifiable,
// not copyable, CKA_ID = KeyID(label)); a signing pair gets its public
// object with CKA_EC_POINT computed from the private key. The token marks
// them CKA_LOCAL false: their material existed outside it.
//
// It refuses, creating nothing, if any object with a target label exists
// (ErrKeyExists naming the labels): it never overwrites. It then checks
// every key it created before returning: the HMAC of a fixed message
// against the one computed here with m.KDK, an AES-GCM round trip in the
// HSM that also opens here with m.Wrap, and a signature from the HSM that
// verifies under the public key derived here from m (and the token's public
// object must hold that key). If creation or a check fails, every object
// this call created is destroyed (best effort) and the error says so; a
// creation still running at its deadline is not known here and its object
// may stay (RootVersions shows it).
//
// m is not modified; the caller clears it. Errors: ErrInvalidMaterial;
// an unknown or repeated kind, version 0; ErrKeyExists; HSM errors. On
// success the loaded keys are refreshed from the token. Safe for
// concurrent use; creation is serialised within the process.
func (h *HSM) ImportRoots(ctx context.Context, version uint32, m *RootMaterial, kinds ...string) error {
	const op = "import roots"
	if err := m.Validate(); err != nil {
		return err
	}
	specs, err := rootSpecs(op, version, kinds)
	if err != nil {
		return err
	}
	jobs := make([]rootJob, len(specs))
	for i, spec := range specs {
		label := KeyLabel(spec.kind, version)
		jobs[i] = rootJob{spec: spec, label: label, make: importer(spec, label, m)}
	}
	keyCreation.Lock()
	defer keyCreation.Unlock()
	return h.makeRoots(ctx, op, jobs, m)
}

// CreateRoots is ImportRoots with keys generated inside the HSM: they
// never exist outside it, so there is no backup. The checks are the same,
// against the public keys read from the token and without known answers
// (HMAC consistency, AES-GCM round trip and a modified tag refused, sign
// and verify).
func (h *HSM) CreateRoots(ctx context.Context, version uint32, kinds ...string) error {
	const op = "create roots"
	specs, err := rootSpecs(op, version, kinds)
	if err != nil {
		return err
	}
	keyCreation.Lock()
	defer keyCreation.Unlock()
	return h.createRoots(ctx, op, version, specs)
}

// createRoots generates specs at version. The caller holds keyCreation.
func (h *HSM) createRoots(ctx context.Context, op string, version uint32, specs []kindSpec) error {
	jobs := make([]rootJob, len(specs))
	for i, spec := range specs {
		label := KeyLabel(spec.kind, version)
		jobs[i] = rootJob{spec: spec, label: label, make: generator(spec, label)}
	}
	return h.makeRoots(ctx, op, jobs, nil)
}

// rootSpecs checks version and kinds (all if empty) and returns their
// specs in creation order.
func rootSpecs(op string, version uint32, kinds []string) ([]kindSpec, error) {
	if version == 0 {
		return nil, fmt.Errorf("hsm: %s: version must be at least 1", op)
	}
	if len(kinds) == 0 {
		return rootKinds, nil
	}
	for i, k := range kinds {
		if _, ok := specOf(k); !ok {
			return nil, fmt.Errorf("hsm: %s: unknown key kind %q (want one of %s)", op, k, strings.Join(RootKinds(), ", "))
		}
		if slices.Contains(kinds[:i], k) {
			return nil, fmt.Errorf("hsm: %s: key kind %q given twice", op, k)
		}
	}
	var specs []kindSpec
	for _, spec := range rootKinds {
		if slices.Contains(kinds, spec.kind) {
			specs = append(specs, spec)
		}
	}
	return specs, nil
}

// rootJob is one root key to make.
type rootJob struct {
	spec  kindSpec
	label string
	// make creates the key's objects, recording each in out as soon as it
	// exists (so that a failure halfway through a pair can be undone).
	make func(m Module, s pkcs11.SessionHandle, out *madeKey) error
}

// madeKey holds the objects made for one rootJob, in generation gen; pub
// is 0 for a secret key.
type madeKey struct {
	key, pub pkcs11.ObjectHandle
	gen      uint64
}

func (k madeKey) objects() []pkcs11.ObjectHandle {
	var out []pkcs11.ObjectHandle
	for _, o := range []pkcs11.ObjectHandle{k.key, k.pub} {
		if o != 0 {
			out = append(out, o)
		}
	}
	return out
}

func generator(spec kindSpec, label string) func(Module, pkcs11.SessionHandle, *madeKey) error {
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(spec.genMech, nil)}
	return func(m Module, s pkcs11.SessionHandle, out *madeKey) error {
		var err error
		if spec.pair {
			pubT, privT := keyPairTemplates(spec, label)
			out.pub, out.key, err = m.GenerateKeyPair(s, mech, pubT, privT)
		} else {
			t := append(secretTemplate(spec, label), pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, rootSecretSize))
			out.key, err = m.GenerateKey(s, mech, t)
		}
		if err != nil {
			return fmt.Errorf("generating %s: %w", label, err)
		}
		return nil
	}
}

func importer(spec kindSpec, label string, mat *RootMaterial) func(Module, pkcs11.SessionHandle, *madeKey) error {
	return func(m Module, s pkcs11.SessionHandle, out *madeKey) error {
		keyT, pubT, err := importTemplates(spec, label, mat)
		if err != nil {
			return err
		}
		if out.key, err = m.CreateObject(s, keyT); err != nil {
			return fmt.Errorf("importing %s: %w", label, err)
		}
		if pubT != nil {
			if out.pub, err = m.CreateObject(s, pubT); err != nil {
				return fmt.Errorf("importing the public key %s: %w", label, err)
			}
		}
		return nil
	}
}

// importTemplates returns the C_CreateObject templates of the key of spec
// from mat: the generation templates with CKA_VALUE instead of
// CKA_VALUE_LEN, and for a pair CKA_EC_PARAMS on the private key (the
// 32-byte Ed25519 seed with the OID form of the parameters, which SoftHSM
// 2.6.1 accepts) and the DER OCTET STRING of the public point on the public
// key (SoftHSM 2.6.1 verifies wrongly with a bare point).
func importTemplates(spec kindSpec, label string, mat *RootMaterial) (key, pub []*pkcs11.Attribute, err error) {
	switch spec.kind {
	case KindKDK:
		return append(secretTemplate(spec, label), pkcs11.NewAttribute(pkcs11.CKA_VALUE, mat.KDK)), nil, nil
	case KindWrap:
		return append(secretTemplate(spec, label), pkcs11.NewAttribute(pkcs11.CKA_VALUE, mat.Wrap)), nil, nil
	}
	var point, secret []byte
	if spec.kind == KindSigEd25519 {
		point, secret = mat.ed25519Public(), mat.Ed25519Seed
	} else {
		p, err := mat.p256Public()
		if err != nil {
			return nil, nil, err
		}
		if point, err = p.Bytes(); err != nil {
			return nil, nil, err
		}
		secret = mat.P256Scalar
	}
	der, err := asn1.Marshal(point)
	if err != nil {
		return nil, nil, err
	}
	pubT, privT := keyPairTemplates(spec, label)
	privT = append(privT,
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, spec.curve),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, secret))
	return privT, append(pubT, pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, der)), nil
}

// makeRoots refuses existing labels, makes jobs, checks them (against mat
// if not nil), and on failure destroys what it made. The caller holds
// keyCreation.
func (h *HSM) makeRoots(ctx context.Context, op string, jobs []rootJob, mat *RootMaterial) error {
	if err := h.refuseExisting(ctx, op, jobs); err != nil {
		return err
	}
	made := make([]madeKey, len(jobs))
	gen := h.gen.Load() // made objects are used in this generation only
	for i := range made {
		made[i].gen = gen
	}
	if err := h.makeAndCheck(ctx, op, jobs, made, mat); err != nil {
		var objs []pkcs11.ObjectHandle
		for _, k := range made {
			objs = append(objs, k.objects()...)
		}
		if derr := h.destroy(context.WithoutCancel(ctx), gen, objs); derr != nil {
			return fmt.Errorf("%w; destroying the %d objects created also failed: %w", err, len(objs), derr)
		}
		return fmt.Errorf("%w (the %d objects created were destroyed)", err, len(objs))
	}
	return h.refreshKeys(ctx, op)
}

func (h *HSM) makeAndCheck(ctx context.Context, op string, jobs []rootJob, made []madeKey, mat *RootMaterial) error {
	for i, j := range jobs {
		// The result comes back through a channel: at a deadline, do
		// returns while the call may still run, and made must not race
		// with it.
		res := make(chan madeKey, 1)
		err := h.doAt(ctx, op, made[i].gen, func(m Module, s pkcs11.SessionHandle) error {
			k := madeKey{gen: made[i].gen}
			err := j.make(m, s, &k)
			res <- k
			return err
		})
		select {
		case made[i] = <-res:
		default:
		}
		if err != nil {
			return err
		}
	}
	if err := h.checkUnique(ctx, op, jobs); err != nil {
		return err
	}
	for i, j := range jobs {
		if err := h.checkRoot(ctx, op, j.spec, j.label, made[i], mat); err != nil {
			return fmt.Errorf("hsm: %s: self-check of %s: %w", op, j.label, err)
		}
	}
	return nil
}

// labelled returns the objects labelled label, of any class.
func labelled(m Module, s pkcs11.SessionHandle, label string) ([]pkcs11.ObjectHandle, error) {
	return findObjects(m, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
}

// refuseExisting fails with ErrKeyExists if an object has a target label.
func (h *HSM) refuseExisting(ctx context.Context, op string, jobs []rootJob) error {
	var exist []string
	err := h.do(ctx, op, func(m Module, s pkcs11.SessionHandle) error {
		for _, j := range jobs {
			hs, err := labelled(m, s, j.label)
			if err != nil {
				return err
			}
			if len(hs) > 0 {
				exist = append(exist, j.label)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(exist) > 0 {
		return fmt.Errorf("%w: %s (nothing was created; keys are never overwritten)", ErrKeyExists, strings.Join(exist, ", "))
	}
	return nil
}

// checkUnique fails with ErrKeyExists if another creator (another process)
// made an object with a target label at the same time.
func (h *HSM) checkUnique(ctx context.Context, op string, jobs []rootJob) error {
	return h.do(ctx, op, func(m Module, s pkcs11.SessionHandle) error {
		for _, j := range jobs {
			hs, err := labelled(m, s, j.label)
			if err != nil {
				return err
			}
			want := 1
			if j.spec.pair {
				want = 2
			}
			if len(hs) != want {
				return fmt.Errorf("%w: %s: %d objects carry the label, want %d (created concurrently elsewhere?)", ErrKeyExists, j.label, len(hs), want)
			}
		}
		return nil
	})
}

// RootVersions returns the versions, ascending, of every key object on the
// token labelled "hsmd/<kind>/v<N>", by kind (as found on the token, also
// for a kind this package does not know, and for half a key pair). A kind
// without objects is absent from the map. Safe for concurrent use.
func (h *HSM) RootVersions(ctx context.Context) (map[string][]uint32, error) {
	var found tokenRoots
	err := h.do(ctx, "root versions", func(m Module, s pkcs11.SessionHandle) error {
		var err error
		found, err = scanRoots(m, s)
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make(map[string][]uint32, len(found))
	for kind := range found {
		out[kind] = found.versions(kind)
	}
	return out, nil
}

// DestroyRoot destroys the key of kind at version: every key object with
// its label (both objects of a pair, or what is left of one). It refuses,
// destroying nothing, if no other complete version of kind is on the token
// (ErrLastVersion): callers must themselves make sure that nothing refers
// to the version any more (tenant versions deriving from a kdk, blobs
// sealed under a wrap key, verifiers of a signing key). The version is
// first removed from the loaded keys, so that new operations cannot pick
// it; an operation already running on it may fail with an invalid key
// handle, which is fatal, and so does the next use of it by another HSM
// (or process) that loaded it. Afterwards the loaded keys are refreshed
// from the token. Errors: an unknown kind; ErrKeyNotFound naming the label;
// ErrLastVersion; HSM errors. Serialised with ImportRoots and CreateRoots
// within the process.
func (h *HSM) DestroyRoot(ctx context.Context, kind string, version uint32) error {
	const op = "destroy root"
	spec, ok := specOf(kind)
	if !ok {
		return fmt.Errorf("hsm: %s: unknown key kind %q (want one of %s)", op, kind, strings.Join(RootKinds(), ", "))
	}
	label := KeyLabel(kind, version)
	keyCreation.Lock()
	defer keyCreation.Unlock()
	var found tokenRoots
	gen := h.gen.Load() // the handles found are used in this generation only
	err := h.doAt(ctx, op, gen, func(m Module, s pkcs11.SessionHandle) error {
		var err error
		found, err = scanRoots(m, s)
		return err
	})
	if err != nil {
		return err
	}
	objs := found[kind][version]
	if len(objs) == 0 {
		return fmt.Errorf("%w: %s", ErrKeyNotFound, label)
	}
	others := 0
	for v, o := range found[kind] {
		if _, _, err := spec.split(KeyLabel(kind, v), o); err == nil && v != version {
			others++
		}
	}
	if others == 0 {
		return fmt.Errorf("%w: %s is the only usable version of %s on the token", ErrLastVersion, label, kind)
	}
	h.dropLoaded(kind, version)
	// The secret or private object first: once it is gone the key is.
	slices.SortStableFunc(objs, func(a, b tokenObject) int {
		return boolInt(a.class != spec.class) - boolInt(b.class != spec.class)
	})
	handles := make([]pkcs11.ObjectHandle, len(objs))
	for i, o := range objs {
		handles[i] = o.handle
	}
	err = h.destroy(context.WithoutCancel(ctx), gen, handles)
	if err != nil {
		err = fmt.Errorf("hsm: %s: %s: %w", op, label, err)
	}
	return errors.Join(err, h.refreshKeys(ctx, op))
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// dropLoaded removes kind at version from the loaded keys, if loaded.
func (h *HSM) dropLoaded(kind string, version uint32) {
	h.keysMu.Lock()
	defer h.keysMu.Unlock()
	for {
		old := h.keys.Load()
		if old == nil || h.keys.CompareAndSwap(old, old.without(kind, version)) {
			return
		}
	}
}
