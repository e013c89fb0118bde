package tpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"io"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"
)

// Sealed blob layout, version 1:
//
//	version (1 byte, 0x01) | flags (1 byte) | SealedBytes (protobuf, go-tpm-tools) | checksum
//
// checksum is SHA-256 of everything before it. flags bit 0 (flagEmpty) marks
// an empty secret: the TPM refuses to seal zero bytes, so one zero byte is
// sealed instead, and Unseal checks that it finds exactly that byte.
//
// The checksum catches accidental damage before the TPM sees the blob (it is
// not a security boundary: the TPM's own integrity check is). The
// SealedBytes hold the sealed object's public and private areas, the PCR
// list and hash of the policy, and the creation data and ticket.
const (
	blobVersion1 = 0x01
	blobHeader   = 2 // version, flags
	flagEmpty    = 0x01
	maxBlobSize  = 16 << 10
)

// emptyStandIn is what is sealed for an empty secret.
var emptyStandIn = []byte{0}

// Seal seals secret (at most MaxSecretSize bytes, possibly empty) to this TPM
// and to the current values of the configured PCRs, and returns an opaque
// blob for Unseal. It seals under the ECC SRK of the owner hierarchy (see
// loadSRK: a transient primary key, flushed before returning, unless the
// standard persistent SRK exists) and persists nothing in the TPM.
//
// Errors: ErrTooLarge, ErrUnavailable, ErrClosed, the context's error, or a
// TPM error (for instance if the owner hierarchy has a password).
func (t *TPM) Seal(ctx context.Context, secret []byte) ([]byte, error) {
	if len(secret) > MaxSecretSize {
		return nil, fmt.Errorf("tpm: seal: %w: %d bytes, the limit is %d", ErrTooLarge, len(secret), MaxSecretSize)
	}
	sel := tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: t.cfg.PCRs}
	var blob []byte
	err := t.do(ctx, "seal", func(rw io.ReadWriter) error {
		srk, release, err := loadSRK(rw)
		if err != nil {
			return err
		}
		defer release()
		data, flags := secret, byte(0)
		if len(secret) == 0 {
			data, flags = emptyStandIn, flagEmpty
		}
		sb, err := srk.Seal(data, client.SealOpts{Current: sel})
		if err != nil {
			return err
		}
		blob, err = encodeBlob(flags, sb)
		return err
	})
	return blob, err
}

// Unseal returns the secret sealed in blob by Seal on this TPM.
//
// Errors: ErrCorrupt (the blob cannot be parsed or the TPM rejects its
// structure), ErrWrongTPM (the TPM's integrity check failed: sealed on
// another TPM, owner hierarchy cleared since, or the blob was altered),
// ErrPCRMismatch (the PCR values changed since sealing), ErrUnavailable,
// ErrClosed, or the context's error. The errors never contain the blob or
// the secret.
func (t *TPM) Unseal(ctx context.Context, blob []byte) ([]byte, error) {
	flags, sb, err := decodeBlob(blob)
	if err != nil {
		return nil, fmt.Errorf("tpm: unseal: %w", err)
	}
	var secret []byte
	err = t.do(ctx, "unseal", func(rw io.ReadWriter) error {
		srk, release, err := loadSRK(rw)
		if err != nil {
			return err
		}
		defer release()
		out, err := srk.Unseal(sb, client.UnsealOpts{})
		if err != nil {
			return classifyUnseal(err, sb.GetPcrs())
		}
		secret = out
		return nil
	})
	if err != nil {
		return nil, err
	}
	if flags&flagEmpty != 0 {
		if !bytes.Equal(secret, emptyStandIn) {
			clear(secret)
			return nil, fmt.Errorf("tpm: unseal: %w", corrupt("the empty-secret flag does not match the sealed data"))
		}
		return []byte{}, nil
	}
	return secret, nil
}

func encodeBlob(flags byte, sb *pb.SealedBytes) ([]byte, error) {
	body, err := proto.Marshal(sb)
	if err != nil {
		return nil, fmt.Errorf("encoding the sealed blob: %w", err)
	}
	blob := make([]byte, 0, blobHeader+len(body)+sha256.Size)
	blob = append(blob, blobVersion1, flags)
	blob = append(blob, body...)
	sum := sha256.Sum256(blob)
	return append(blob, sum[:]...), nil
}

// decodeBlob parses and checks a blob; its errors wrap ErrCorrupt.
func decodeBlob(blob []byte) (flags byte, sb *pb.SealedBytes, err error) {
	switch {
	case len(blob) > maxBlobSize:
		return 0, nil, corrupt(fmt.Sprintf("%d bytes, more than any sealed blob (%d)", len(blob), maxBlobSize))
	case len(blob) < blobHeader+sha256.Size:
		return 0, nil, corrupt(fmt.Sprintf("%d bytes, too short (truncated?)", len(blob)))
	case blob[0] != blobVersion1:
		return 0, nil, corrupt(fmt.Sprintf("unknown format version %d", blob[0]))
	case blob[1]&^flagEmpty != 0:
		return 0, nil, corrupt(fmt.Sprintf("unknown flags %#x", blob[1]))
	}
	n := len(blob) - sha256.Size
	sum := sha256.Sum256(blob[:n])
	if subtle.ConstantTimeCompare(sum[:], blob[n:]) != 1 {
		return 0, nil, corrupt("checksum mismatch (truncated or altered)")
	}
	sb = new(pb.SealedBytes)
	if err := proto.Unmarshal(blob[blobHeader:n], sb); err != nil {
		return 0, nil, corrupt("cannot parse the sealed object")
	}
	if err := checkSealed(sb); err != nil {
		return 0, nil, err
	}
	return blob[1], sb, nil
}

func checkSealed(sb *pb.SealedBytes) error {
	if sb.GetSrk() != pb.ObjectType_ECC {
		return corrupt(fmt.Sprintf("sealed under a %v storage root key, not ECC", sb.GetSrk()))
	}
	if sb.GetHash() != pb.HashAlgo_SHA256 {
		return corrupt(fmt.Sprintf("PCR policy uses hash %v, not SHA-256", sb.GetHash()))
	}
	if len(sb.GetPub()) == 0 || len(sb.GetPriv()) == 0 {
		return corrupt("the sealed object is missing")
	}
	if len(sb.GetPcrs()) > numPCRs {
		return corrupt("too many PCRs in the policy")
	}
	for _, p := range sb.GetPcrs() {
		if p >= numPCRs {
			return corrupt(fmt.Sprintf("PCR %d in the policy is out of range", p))
		}
	}
	return nil
}
