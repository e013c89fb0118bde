package tpm

import (
	"errors"
	"fmt"

	"github.com/google/go-tpm/legacy/tpm2"
)

// Errors returned (wrapped, with what the operator can do) by this package.
// Test for them with errors.Is.
var (
	// ErrTooLarge: the secret given to Seal is longer than MaxSecretSize.
	ErrTooLarge = errors.New("secret too large to seal")
	// ErrPCRMismatch: the PCR policy of a sealed blob failed, the PCR values
	// changed since it was sealed (a firmware, boot loader or Secure Boot change).
	ErrPCRMismatch = errors.New("PCR values differ from those the secret was sealed to")
	// ErrWrongTPM: the TPM refused the blob's integrity check: it was sealed on
	// another TPM, or this TPM's storage hierarchy was cleared since, or the
	// blob was altered.
	ErrWrongTPM = errors.New("sealed blob does not belong to this TPM")
	// ErrCorrupt: the blob cannot be parsed (truncated, altered, or not a blob).
	ErrCorrupt = errors.New("sealed blob is corrupt")
	// ErrCounterExists: DefineCounter found the NV index already defined.
	ErrCounterExists = errors.New("rollback counter already defined")
	// ErrNoCounter: the counter's NV index is not defined (or not initialised).
	ErrNoCounter = errors.New("rollback counter not defined")
	// ErrUnavailable: the TPM (device or socket) cannot be reached, or the
	// connection broke during the command.
	ErrUnavailable = errors.New("TPM unavailable")
	// ErrClosed: the TPM was closed.
	ErrClosed = errors.New("TPM closed")
)

// tpmCode returns the TPM response code class of err and whether err carries
// one. Only the code is used; parameter, handle and session numbers are not.
func tpmCode(err error) (code tpm2.RCFmt1, kind string, ok bool) {
	var (
		pe tpm2.ParameterError
		he tpm2.HandleError
		se tpm2.SessionError
	)
	switch {
	case errors.As(err, &pe):
		return pe.Code, "parameter", true
	case errors.As(err, &he):
		return he.Code, "handle", true
	case errors.As(err, &se):
		return se.Code, "session", true
	}
	return 0, "", false
}

// classifyUnseal maps the errors of client.Key.Unseal to the package's
// sentinels. The TPM cannot tell a blob from another TPM from an altered one:
// both fail the integrity check of TPM2_Load.
func classifyUnseal(err error, pcrs []uint32) error {
	code, kind, ok := tpmCode(err)
	switch {
	case !ok:
		return err
	case kind == "session" && (code == tpm2.RCPolicyFail || code == tpm2.RCPolicyCC):
		return fmt.Errorf("%w (PCRs %v, SHA-256): the boot state changed since sealing; "+
			"if the change is expected, recover the secret from its backup and seal it again", ErrPCRMismatch, pcrs)
	case code == tpm2.RCIntegrity:
		return fmt.Errorf("%w: it was sealed on another TPM, the TPM's owner hierarchy was cleared, "+
			"or the blob was altered; restore the secret from its backup and seal it again", ErrWrongTPM)
	case kind == "parameter":
		return fmt.Errorf("%w: the TPM rejected it (%v); restore the blob or the secret from a backup", ErrCorrupt, err)
	}
	return err
}

func corrupt(what string) error {
	return fmt.Errorf("%w: %s; restore the blob or the secret from a backup", ErrCorrupt, what)
}
