package server

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/wire"
	"github.com/hsmd/hsmd/store"
)

// Sizes of the Kubernetes KMS v2 API (k8s.io/kms/apis/v2): the API server
// refuses a ciphertext ("encrypted DEK source") or a key ID over 1 KiB.
const (
	// KMSMaxCiphertext is the largest ciphertext the KMS v2 plugin returns
	// or accepts.
	KMSMaxCiphertext = 1024
	// KMSMaxPlaintext is the largest plaintext the KMS v2 plugin seals: its
	// ciphertext is KMSMaxCiphertext. The API server sends 32 bytes.
	KMSMaxPlaintext = KMSMaxCiphertext - wire.Overhead
	// KMSAPIVersion is the version Status reports.
	KMSAPIVersion = "v2"
)

// kmsContext is the encryption context bound (in the AAD, not stored) to
// every KMS v2 ciphertext: a data key sealed for the API server opens only
// as one, never as an Envelope item of the same tenant without it.
var kmsContext = map[string]string{"hsmd.kms": "k8s.io/kms/v2"}

// errKMSDecrypt is the one error of a KMS Decrypt whose ciphertext is not
// one this tenant's keys open: malformed, tampered, another tenant's, or
// of an unknown key version. It says nothing more.
var errKMSDecrypt = status.Error(codes.InvalidArgument, "the ciphertext cannot be decrypted")

// KMSKeyID is the KMS v2 key ID of a tenant's key version:
// "hsmd:<tenant>:v<version>" (at most 80 bytes: tenant names are at most 64).
// The API server compares it with the key ID stored with each object to
// find data written under an older version.
func KMSKeyID(tenant string, version uint32) string {
	return "hsmd:" + tenant + ":v" + strconv.FormatUint(uint64(version), 10)
}

// RegisterKMSv2 adds the Kubernetes KMS v2 plugin service
// (v2.KeyManagementService) to g, sealing under the named tenant's current
// key version. Build g with ServerOptions, as for Register, so that the
// interceptor (request IDs, error mapping, metrics, audit) applies; serve
// it on a unix socket only the API server can reach. The tenant need not
// exist yet: until it does, every call fails with NOT_FOUND. It returns an
// error only for an invalid tenant name.
func (s *Server) RegisterKMSv2(g *grpc.Server, tenant string) error {
	if err := store.ValidateName(tenant); err != nil {
		return fmt.Errorf("server: kms tenant: %w", err)
	}
	kmsapi.RegisterKeyManagementServiceServer(g, &kmsService{s: s, tenant: tenant})
	return nil
}

// kmsService is the KMS v2 plugin for one tenant. It is safe for
// concurrent use.
type kmsService struct {
	kmsapi.UnimplementedKeyManagementServiceServer
	s      *Server
	tenant string
}

// Status reports healthz "ok" only while the HSM is ready and the audit
// log takes entries (any other value is shown by the API server's
// healthz), and the key ID of the tenant's current version.
func (k *kmsService) Status(ctx context.Context, _ *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	t, err := k.s.tenant(ctx, k.tenant)
	if err != nil {
		return nil, err
	}
	if _, ok := keyRef(t, t.Current); !ok {
		return nil, fmt.Errorf("%w: tenant %q has no enabled current key version", errPrecondition, t.Name)
	}
	return &kmsapi.StatusResponse{Version: KMSAPIVersion, Healthz: k.s.kmsHealthz(ctx), KeyId: KMSKeyID(t.Name, t.Current)}, nil
}

// kmsHealthz is "ok" or a fixed reason (the details are in hsmd's log).
func (s *Server) kmsHealthz(ctx context.Context) string {
	if s.cfg.Ready != nil {
		if err := s.cfg.Ready(ctx); err != nil {
			return "hsmd: the HSM is not ready"
		}
	}
	if s.cfg.Audit != nil && s.cfg.Audit.Err() != nil {
		return "hsmd: the audit log takes no entries"
	}
	return "ok"
}

// Encrypt seals the plaintext (a data key or seed of the API server) under
// the tenant's current key version. Errors: INVALID_ARGUMENT for an empty
// plaintext or one over KMSMaxPlaintext; NOT_FOUND for a missing tenant;
// UNAVAILABLE while the HSM cannot derive.
func (k *kmsService) Encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	s := k.s
	if n := len(req.Plaintext); n == 0 || n > KMSMaxPlaintext {
		return nil, &limitError{what: "the plaintext's length", limit: "kms_max_plaintext", got: n, max: KMSMaxPlaintext}
	}
	t, err := s.tenant(ctx, k.tenant)
	if err != nil {
		return nil, err
	}
	ref, ok := keyRef(t, t.Current)
	if !ok {
		return nil, fmt.Errorf("%w: tenant %q has no enabled current key version", errPrecondition, t.Name)
	}
	cts, err := s.cfg.Engine.Seal(ctx, ref, []envelope.Item{{Plaintext: req.Plaintext, Context: kmsContext}})
	if err != nil {
		return nil, err
	}
	s.cfg.Metrics.items.WithLabelValues("Encrypt", "ok").Inc()
	s.cfg.Metrics.bytes.WithLabelValues("Encrypt", "in").Add(float64(len(req.Plaintext)))
	return &kmsapi.EncryptResponse{Ciphertext: cts[0], KeyId: KMSKeyID(t.Name, ref.Version)}, nil
}

// Decrypt opens a ciphertext of Encrypt under any version of the tenant
// that may decrypt, so data written before a rotation keeps reading. The
// request's key ID and annotations are not needed: the ciphertext names
// its version, bound in its AAD. Errors: one INVALID_ARGUMENT for any
// ciphertext these keys do not open; FAILED_PRECONDITION for a disabled,
// destroyed or retired version; UNAVAILABLE while the HSM cannot derive.
func (k *kmsService) Decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	s := k.s
	if n := len(req.Ciphertext); n == 0 || n > KMSMaxCiphertext {
		return nil, &limitError{what: "the ciphertext's length", limit: "kms_max_ciphertext", got: n, max: KMSMaxCiphertext}
	}
	if _, err := s.tenant(ctx, k.tenant); err != nil {
		return nil, err
	}
	opened, err := s.cfg.Engine.Open(ctx, s.resolver(k.tenant), []envelope.Ciphertext{{Data: req.Ciphertext, Context: kmsContext}})
	if err != nil {
		return nil, err
	}
	if err := opened[0].Err; err != nil {
		if errors.Is(err, envelope.ErrMalformed) || errors.Is(err, envelope.ErrDecrypt) {
			s.cfg.Metrics.items.WithLabelValues("Decrypt", ReasonDecryptFailed).Inc()
			return nil, errKMSDecrypt
		}
		ie := itemError(ctx, s.log, err)
		s.cfg.Metrics.items.WithLabelValues("Decrypt", ie.Reason).Inc()
		return nil, status.Error(codes.Code(ie.Code), ie.Message)
	}
	s.cfg.Metrics.items.WithLabelValues("Decrypt", "ok").Inc()
	s.cfg.Metrics.bytes.WithLabelValues("Decrypt", "out").Add(float64(len(opened[0].Plaintext)))
	return &kmsapi.DecryptResponse{Plaintext: opened[0].Plaintext}, nil
}

// kmsStatusMethod is the KMS v2 health probe's full method name.
var kmsStatusMethod = "/" + kmsapi.KeyManagementService_ServiceDesc.ServiceName + "/Status"
