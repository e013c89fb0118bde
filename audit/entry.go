package audit

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Kinds of entry.
const (
	// KindRPC is one call of the data plane (Encrypt, Decrypt, Rewrap, a
	// read of a tenant or key), batch and all, after it ran.
	KindRPC = "rpc"
	// KindRequest is a call that changes keys or tenants, recorded durably
	// before it runs; the call is refused if this entry cannot be written.
	KindRequest = "request"
	// KindResponse is the outcome of a KindRequest call, durable before
	// the reply.
	KindResponse = "response"
	// KindKeyEvent is a committed change to a tenant's keys (by a call or
	// by the rotation scheduler), durable before it is acknowledged.
	KindKeyEvent = "key_event"
	// KindSystem is an event of hsmd itself (start, stop).
	KindSystem = "system"
)

// MaxContexts is the number of distinct caller contexts whose HMACs one
// entry records; ContextsTruncated says when a batch had more.
const MaxContexts = 16

// Entry is one record of the audit log, stored as one JSON object per leaf.
// It holds who, what and when, never plaintext, ciphertext, keys or PINs:
// caller-supplied contexts appear only as HMAC-SHA256 under the log's own
// key (ContextHMAC), as Vault's audit devices do.
type Entry struct {
	// Seq is the entry's leaf index. It is not stored in the entry: the
	// readers (Entries) set it from the entry's position. tessera's queue
	// may flush one batch in two and integrate the halves in either order,
	// so an entry cannot know its index when it is hashed.
	Seq uint64 `json:"-"`
	// Time is when the Log recorded the entry.
	Time time.Time `json:"time"`
	Kind string    `json:"kind"`
	// RequestID links the entries of one call (and hsmd's own log lines).
	RequestID string `json:"request_id,omitempty"`
	// Caller is the authenticated identity of the caller.
	Caller string `json:"caller,omitempty"`
	// Method is the gRPC method name (Encrypt, RotateKey, ...).
	Method string `json:"method,omitempty"`
	// Op is the operation of a key event (rotate, disable, shred, ...) or
	// the event of a system entry (start, stop).
	Op          string   `json:"op,omitempty"`
	Tenant      string   `json:"tenant,omitempty"`
	KeyVersions []uint32 `json:"key_versions,omitempty"`
	// Items is the number of items of a batch; FailedItems how many of
	// them failed alone (bad ciphertext, ...).
	Items       int `json:"items,omitempty"`
	FailedItems int `json:"failed_items,omitempty"`
	// Code is the gRPC status code of the call ("OK", "NOT_FOUND", ...).
	Code string `json:"code,omitempty"`
	// Contexts are the HMACs of the distinct caller contexts of the call
	// (at most MaxContexts; ContextsTruncated if there were more).
	Contexts          []string `json:"context_hmacs,omitempty"`
	ContextsTruncated bool     `json:"contexts_truncated,omitempty"`
	// Detail is a short, non-secret remark (the rollback counter at start,
	// the reason of a refusal).
	Detail string `json:"detail,omitempty"`
}

// MaxEntrySize bounds one marshalled entry (C2SP tlog-tiles entries are at
// most 64 KiB).
const MaxEntrySize = 1<<16 - 1

func (e *Entry) marshal() ([]byte, error) {
	b, err := json.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("audit: marshal entry: %w", err)
	}
	if len(b) > MaxEntrySize {
		return nil, fmt.Errorf("audit: entry of %d bytes exceeds %d", len(b), MaxEntrySize)
	}
	return b, nil
}

// ParseEntry decodes one stored entry strictly: unknown fields and
// trailing data are errors.
func ParseEntry(b []byte) (*Entry, error) {
	if len(b) > MaxEntrySize {
		return nil, errors.New("audit: entry too large")
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	var e Entry
	if err := d.Decode(&e); err != nil {
		return nil, fmt.Errorf("audit: malformed entry: %w", err)
	}
	if d.More() {
		return nil, errors.New("audit: malformed entry: trailing data")
	}
	if e.Kind == "" {
		return nil, errors.New("audit: malformed entry: no kind")
	}
	return &e, nil
}

// ContextHasher computes the HMACs of caller contexts under one log's key.
// Equal contexts give equal HMACs within one log, so an auditor holding a
// context value can find its entries (with the key, via hsmd), while the
// log itself never reveals it.
type ContextHasher struct{ key []byte }

// NewContextHasher returns a ContextHasher over a key of at least 32 bytes.
func NewContextHasher(key []byte) (*ContextHasher, error) {
	if len(key) < 32 {
		return nil, errors.New("audit: context HMAC key shorter than 32 bytes")
	}
	return &ContextHasher{key: bytes.Clone(key)}, nil
}

// Sum returns "hmac-sha256:" and the base64 HMAC of ctx.
func (h *ContextHasher) Sum(ctx []byte) string {
	m := hmac.New(sha256.New, h.key)
	m.Write(ctx)
	return "hmac-sha256:" + base64.RawStdEncoding.EncodeToString(m.Sum(nil))
}

// String hides the key.
func (h *ContextHasher) String() string { return "audit.ContextHasher{REDACTED}" }

// GoString hides the key.
func (h *ContextHasher) GoString() string { return h.String() }
