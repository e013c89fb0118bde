package client

import (
	"context"
	"errors"
	"fmt"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"google.golang.org/grpc/codes"
)

// ErrDecrypt is the error of an item that failed authentication: tampered,
// truncated, of another tenant, under another context, or under an unknown
// key. The server does not say which, by design, and neither does this
// error.
var ErrDecrypt = errors.New("hsmd client: decryption failed")

// ErrMalformed is wrapped by the error of an input that is not a
// ciphertext at all, or is of an unsupported format version. It is also
// returned (wrapped) by [FromText].
var ErrMalformed = errors.New("hsmd client: malformed ciphertext")

// ErrKeyDisabled is wrapped by the error of an item under a key version
// that is disabled ([Client.DisableVersion]) or scheduled for destruction
// ([Client.ScheduleDestroy]). Enabling the version, or cancelling its
// destruction and enabling it, makes the item decrypt again.
var ErrKeyDisabled = errors.New("hsmd client: the key version is disabled")

// ErrKeyDestroyed is wrapped by the error of an item under a key version
// that is destroyed: the item can never be decrypted again.
var ErrKeyDestroyed = errors.New("hsmd client: the key version is destroyed")

// ErrKeyRetired is wrapped by the error of an item under a key version
// below the tenant's [Policy.MinDecryptionVersion].
var ErrKeyRetired = errors.New("hsmd client: the key version is retired")

// Item reasons carried in the wire's ItemError.reason.
const (
	reasonDecryptFailed = "DECRYPT_FAILED"
	reasonMalformed     = "MALFORMED"
	reasonKeyDisabled   = "KEY_DISABLED"
	reasonKeyDestroyed  = "KEY_DESTROYED"
	reasonKeyRetired    = "KEY_VERSION_RETIRED"
)

// reasonErrs are the sentinels that ItemError.Unwrap returns, by reason.
var reasonErrs = map[string]error{
	reasonMalformed:    ErrMalformed,
	reasonKeyDisabled:  ErrKeyDisabled,
	reasonKeyDestroyed: ErrKeyDestroyed,
	reasonKeyRetired:   ErrKeyRetired,
}

// Item is one record to encrypt.
type Item struct {
	Plaintext []byte
	// Context is bound to the ciphertext as additional authenticated data:
	// decryption needs exactly the same map (nil and empty are the same).
	// It is not secret, but the server never logs it.
	Context map[string]string
}

// CiphertextItem is one record to decrypt.
type CiphertextItem struct {
	// Ciphertext is a binary ciphertext or its text form ([ToText]).
	Ciphertext []byte
	// Context must equal the one the item was encrypted with.
	Context map[string]string
}

// Result is the outcome of decrypting one item: Plaintext when Err is nil.
// Plaintext may be nil for an empty plaintext.
type Result struct {
	Plaintext []byte
	// Err is nil, ErrDecrypt, an *ItemError wrapping ErrMalformed, an
	// *ItemError with code codes.FailedPrecondition wrapping
	// ErrKeyDisabled, ErrKeyDestroyed or ErrKeyRetired (the item's key
	// version refuses to decrypt), or an *ItemError with another code
	// (codes.Unavailable when the item's key could not be derived; retrying
	// may succeed). Check it with errors.Is.
	Err error
}

// ItemError is the failure of one item of a batch, other than an
// authentication failure (which is [ErrDecrypt]). Its message comes from
// the server and never holds secrets or item contents.
type ItemError struct {
	Code    codes.Code
	Reason  string // machine-readable, e.g. "MALFORMED", "KEY_DISABLED", "UNAVAILABLE"
	Message string
}

func (e *ItemError) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("hsmd client: item failed: %s (%s)", e.Reason, e.Code)
	}
	return fmt.Sprintf("hsmd client: item failed: %s (%s)", e.Message, e.Code)
}

// Unwrap returns the sentinel of the reason: ErrMalformed for
// "MALFORMED", ErrKeyDisabled for "KEY_DISABLED", ErrKeyDestroyed for
// "KEY_DESTROYED", ErrKeyRetired for "KEY_VERSION_RETIRED"; else nil.
func (e *ItemError) Unwrap() error { return reasonErrs[e.Reason] }

// itemErr maps a wire item error to the Go error documented on Result.
func itemErr(e *hsmdv1.ItemError) error {
	if e.GetReason() == reasonDecryptFailed {
		return ErrDecrypt
	}
	code := codes.Code(e.GetCode())
	if code == codes.OK {
		code = codes.Unknown // an error must not claim success
	}
	return &ItemError{Code: code, Reason: e.GetReason(), Message: e.GetMessage()}
}

// Encrypt seals items under the tenant's current key version in one RPC.
// It returns one binary ciphertext per item, in order, and the key version
// used. The whole call succeeds or fails: errors are gRPC status errors from
// the server (codes.NotFound for an unknown tenant) or "hsmd client: "
// errors for a malformed response. The ciphertexts share one buffer (the
// response's): keeping one keeps all; bytes.Clone one to keep it alone.
func (c *Client) Encrypt(ctx context.Context, tenant string, items []Item) ([][]byte, uint32, error) {
	req := &hsmdv1.EncryptRequest{Tenant: tenant, Items: make([]*hsmdv1.EncryptItem, len(items))}
	for i, it := range items {
		req.Items[i] = &hsmdv1.EncryptItem{Plaintext: it.Plaintext, Context: it.Context}
	}
	resp, err := c.env.Encrypt(ctx, req)
	if err != nil {
		return nil, 0, err
	}
	if n := len(resp.GetCiphertexts()); n != len(items) {
		return nil, 0, fmt.Errorf("hsmd client: server returned %d ciphertexts for %d items", n, len(items))
	}
	return resp.GetCiphertexts(), resp.GetKeyVersion(), nil
}

// Decrypt opens items in one RPC and returns one result per item, in
// order: one bad item does not fail the others. tenant may be empty (each
// ciphertext names its tenant); when set, items of other tenants fail with
// ErrDecrypt. The returned error is non-nil only when the whole call
// failed (a gRPC status error, or a malformed response). The plaintexts
// share one buffer, as Encrypt's ciphertexts do.
func (c *Client) Decrypt(ctx context.Context, tenant string, items []CiphertextItem) ([]Result, error) {
	req := &hsmdv1.DecryptRequest{Tenant: tenant, Items: make([]*hsmdv1.DecryptItem, len(items))}
	for i, it := range items {
		req.Items[i] = &hsmdv1.DecryptItem{Ciphertext: it.Ciphertext, Context: it.Context}
	}
	resp, err := c.env.Decrypt(ctx, req)
	if err != nil {
		return nil, err
	}
	if n := len(resp.GetResults()); n != len(items) {
		return nil, fmt.Errorf("hsmd client: server returned %d results for %d items", n, len(items))
	}
	out := make([]Result, len(items))
	for i, r := range resp.GetResults() {
		if r.GetError() != nil {
			out[i].Err = itemErr(r.GetError())
			continue
		}
		out[i].Plaintext = r.GetPlaintext()
	}
	return out, nil
}

// EncryptOne seals one item and returns its binary ciphertext. Errors are
// as for [Client.Encrypt]; if ctx ends first, see "Batching" in the
// package documentation. Concurrent calls are coalesced into batch RPCs
// unless auto-batching is off ([WithAutoBatch]).
func (c *Client) EncryptOne(ctx context.Context, tenant string, item Item) ([]byte, error) {
	return c.one.encryptOne(ctx, tenant, item)
}

// DecryptOne opens one item and returns its plaintext. The error is the
// call's error or the item's ([Result.Err]): check it with
// errors.Is(err, ErrDecrypt), errors.Is(err, ErrMalformed) and so on.
// Concurrent calls are coalesced as for [Client.EncryptOne].
func (c *Client) DecryptOne(ctx context.Context, tenant string, item CiphertextItem) ([]byte, error) {
	return c.one.decryptOne(ctx, tenant, item)
}

// direct sends each single-item call as its own RPC.
type direct struct{ c *Client }

func (d direct) encryptOne(ctx context.Context, tenant string, item Item) ([]byte, error) {
	cts, _, err := d.c.Encrypt(ctx, tenant, []Item{item})
	if err != nil {
		return nil, err
	}
	return cts[0], nil
}

func (d direct) decryptOne(ctx context.Context, tenant string, item CiphertextItem) ([]byte, error) {
	rs, err := d.c.Decrypt(ctx, tenant, []CiphertextItem{item})
	if err != nil {
		return nil, err
	}
	return rs[0].Plaintext, rs[0].Err
}
