package main

// The rewrap command: stream a file of ciphertexts through batched Rewrap
// calls, so data moves onto a tenant's current key version, resumably.
//
// Choices:
//   - A record that fails (an item error from the server, or a text line
//     that is not a text-form ciphertext) stops the run with
//     "record N: reason"; nothing of its batch is written, so the resume
//     state stays at the last complete batch. With --skip-failed FILE the
//     failed records are appended to FILE as "record N: reason" lines (no
//     ciphertext content) and copied to the output unchanged.
//   - Framing errors (a blank line, a binary length over 8 MiB, a truncated
//     record) always stop the run, after the records before them are
//     committed.
//   - Batches end at --batch records or maxRewrapBatchBytes of ciphertext,
//     whichever comes first; --timeout bounds each batch's call.
//   - The output (and a new --skip-failed file) is created with mode 0600.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/internal/ctstream"
	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/internal/progress"
)

const (
	// maxRewrapBatchBytes ends a batch early, well under cliMsgSize.
	maxRewrapBatchBytes = 32 << 20
	// resumeStateVersion is the version of the resume file's format.
	resumeStateVersion = 1
	// maxResumeFile bounds what is read of a resume file.
	maxResumeFile = 64 << 10
)

var (
	errResumeMismatch = errors.New("the resume file is of another run")
	errOutputExists   = errors.New("the output file exists")
)

func init() {
	register("rewrap", command{summary: "move a file of ciphertexts onto a tenant's current key version", run: runRewrap})
}

// resumeState is the resume file: what this run is, and how far it got.
// Records, InputOffset, OutputLength and SkipLength describe the last
// batch that was written and fsync'd.
type resumeState struct {
	Version      int    `json:"version"`
	Input        string `json:"input"`
	InputSize    int64  `json:"input_size"`
	Output       string `json:"output"`
	Format       string `json:"format"`
	Tenant       string `json:"tenant"`
	Records      int64  `json:"records"`
	InputOffset  int64  `json:"input_offset"`
	OutputLength int64  `json:"output_length"`
	Skipped      int64  `json:"skipped"`
	SkipFile     string `json:"skip_file,omitempty"`
	SkipLength   int64  `json:"skip_length,omitempty"`
	Complete     bool   `json:"complete"`
}

// loadResumeState reads a resume file; it returns nil, nil if there is none.
func loadResumeState(path string) (*resumeState, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("resume file: %w", err)
	}
	defer f.Close()
	dec := json.NewDecoder(io.LimitReader(f, maxResumeFile))
	dec.DisallowUnknownFields()
	var st resumeState
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("resume file %s is not a rewrap resume file: %w", path, err)
	}
	if st.Version != resumeStateVersion {
		return nil, fmt.Errorf("resume file %s has version %d; this hsmd reads version %d", path, st.Version, resumeStateVersion)
	}
	if st.Records < 0 || st.InputOffset < 0 || st.OutputLength < 0 || st.SkipLength < 0 {
		return nil, fmt.Errorf("resume file %s has a negative count", path)
	}
	return &st, nil
}

// save writes the state durably: temp file, fsync, rename, fsync of the
// directory.
func (st *resumeState) save(path string) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing the resume file: %w", err)
	}
	return nil
}

// matches returns an error wrapping errResumeMismatch unless st is of the
// run described by want.
func (st *resumeState) matches(want *resumeState, path string) error {
	if st.Input == want.Input && st.Output == want.Output && st.Format == want.Format && st.Tenant == want.Tenant {
		if st.InputSize != want.InputSize {
			return withHint(fmt.Errorf("%w: the input was %d bytes when the run began and is %d now", errResumeMismatch, st.InputSize, want.InputSize),
				"the input changed since the run began: start again with a new --out and --resume file")
		}
		return nil
	}
	return withHint(fmt.Errorf("%w: %s records --in %s --out %s --format %s --tenant %s", errResumeMismatch, path, st.Input, st.Output, st.Format, st.Tenant),
		"give the arguments of the run it records, or another --resume file for this run")
}

// rewrapArgs are the parsed flags of one rewrap invocation.
type rewrapArgs struct {
	tenant, in, out, format, resume, skip string
	batch                                 int
	aad                                   contextFlag
	cf                                    *connFlags
}

const rewrapSynopsis = "hsmd rewrap --tenant T --in FILE --out FILE [--format text|binary] [--batch 1000] [--resume FILE] [--skip-failed FILE] [--context k=v ...]"

func parseRewrapArgs(env *cliEnv, args []string) (*rewrapArgs, error) {
	fs, cf := newClientFlagSet(env, "rewrap", rewrapSynopsis)
	a := &rewrapArgs{cf: cf, aad: contextFlag{}}
	fs.StringVar(&a.tenant, "tenant", "", "tenant `name` (required)")
	fs.StringVar(&a.in, "in", "", "input `file` of ciphertexts (required)")
	fs.StringVar(&a.out, "out", "", "output `file`, created; never overwritten without --resume (required)")
	fs.StringVar(&a.format, "format", "text", "`format` of input and output: text (one hsmd:v1: form a line) or binary (u32 big-endian length, then the ciphertext)")
	fs.IntVar(&a.batch, "batch", 1000, "records per Rewrap call")
	fs.StringVar(&a.resume, "resume", "", "keep progress in this `file`; run again with it to continue after an interruption")
	fs.StringVar(&a.skip, "skip-failed", "", "append records that fail to this `file` (number and reason) and copy them unchanged, instead of stopping")
	fs.Var(a.aad, "context", "`k=v` the ciphertexts are bound to (repeatable)")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return nil, err
	}
	switch {
	case len(pos) > 0:
		return nil, &usageError{msg: "rewrap takes no arguments: usage: " + rewrapSynopsis}
	case a.tenant == "" || a.in == "" || a.out == "":
		return nil, &usageError{msg: "rewrap: --tenant, --in and --out are required"}
	case a.format != "text" && a.format != "binary":
		return nil, &usageError{msg: fmt.Sprintf("rewrap: --format must be text or binary, not %q", a.format)}
	case a.batch < 1:
		return nil, &usageError{msg: "rewrap: --batch must be at least 1"}
	}
	for _, p := range []*string{&a.in, &a.out, &a.resume, &a.skip} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return nil, err
			}
		}
	}
	names := map[string]bool{}
	for _, p := range []string{a.in, a.out, a.resume, a.skip} {
		if p != "" && names[p] {
			return nil, &usageError{msg: "rewrap: --in, --out, --resume and --skip-failed must be different files"}
		}
		names[p] = true
	}
	return a, nil
}

// rewrapItem is one record of a batch.
type rewrapItem struct {
	orig []byte // the record as read
	ct   []byte // the binary ciphertext to send
	err  error  // why it cannot be sent, if so
}

// rewrapRun is one rewrap in progress.
type rewrapRun struct {
	args    *rewrapArgs
	c       *client.Client
	text    bool
	in      *os.File
	rr      *ctstream.Reader
	out     *os.File
	rw      *ctstream.Writer
	skip    *os.File // nil without --skip-failed
	st      resumeState
	meter   *progress.Meter
	resumed int64 // records done before this run
}

func runRewrap(ctx context.Context, env *cliEnv, args []string) error {
	a, err := parseRewrapArgs(env, args)
	if err != nil {
		return err
	}
	c, err := a.cf.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	r := &rewrapRun{args: a, c: c}
	done, err := r.open(env)
	defer r.close()
	if err != nil || done {
		return err
	}
	r.meter = progress.New(env.stderr, "hsmd: rewrap", r.st.InputSize, r.st.Records)
	r.meter.Start()
	err = r.loop(ctx)
	elapsed, rate := r.meter.Finish()
	r.summary(env.stderr, elapsed, rate)
	if err == nil {
		err = r.finish()
	}
	return err
}

// open opens the files and loads or starts the resume state. done is true
// when the resume file says the run is already complete.
func (r *rewrapRun) open(env *cliEnv) (done bool, err error) {
	a := r.args
	in, err := os.Open(a.in)
	if err != nil {
		return false, fmt.Errorf("opening --in: %w", err)
	}
	r.in, r.text = in, a.format == "text"
	r.st = resumeState{Version: resumeStateVersion, Input: a.in, InputSize: -1, Output: a.out, Format: a.format, Tenant: a.tenant}
	fi, err := in.Stat()
	if err != nil {
		return false, fmt.Errorf("opening --in: %w", err)
	}
	if fi.Mode().IsRegular() {
		r.st.InputSize = fi.Size()
	} else if a.resume != "" {
		return false, &usageError{msg: "rewrap: --resume needs --in to be a regular file"}
	}
	var prev *resumeState
	if a.resume != "" {
		if prev, err = loadResumeState(a.resume); err != nil {
			return false, err
		}
	}
	if prev == nil {
		return false, r.create()
	}
	if err := prev.matches(&r.st, a.resume); err != nil {
		return false, err
	}
	if prev.Complete {
		fmt.Fprintf(env.stderr, "hsmd: rewrap: already complete: %d records in %s (resume file %s)\n", prev.Records, prev.Output, a.resume)
		return true, nil
	}
	return false, r.reopen(prev)
}

// create starts a new run: the output must not exist.
func (r *rewrapRun) create() error {
	a := r.args
	if _, err := os.Stat(a.out); err == nil {
		hint := "rewrap never overwrites its output: choose another --out, or delete it"
		if a.resume == "" {
			hint += "; to continue an interrupted run, give its --resume FILE"
		}
		return withHint(fmt.Errorf("%w: %s", errOutputExists, a.out), hint)
	}
	if a.resume != "" {
		// Saved before the output exists, so a crash between the two leaves
		// a run that resumes (reopen creates a missing empty output).
		if err := r.st.save(a.resume); err != nil {
			return err
		}
	}
	out, err := os.OpenFile(a.out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		hint := "rewrap never overwrites its output: choose another --out, or delete it"
		if a.resume == "" {
			hint += "; to continue an interrupted run, give its --resume FILE"
		}
		return withHint(fmt.Errorf("%w: %s", errOutputExists, a.out), hint)
	}
	if err != nil {
		return fmt.Errorf("creating --out: %w", err)
	}
	r.out = out
	r.rr = ctstream.NewReader(r.in, r.text, 0, 0)
	r.rw = ctstream.NewWriter(out, r.text, 0)
	if err := fsutil.SyncDir(filepath.Dir(a.out)); err != nil {
		return err
	}
	if err := r.openSkip(); err != nil {
		return err
	}
	if a.resume == "" {
		return nil
	}
	return r.st.save(a.resume) // so that a run interrupted in its first batch resumes
}

// reopen continues the run prev records: the output is cut back to the
// last committed batch and the input read from after it.
func (r *rewrapRun) reopen(prev *resumeState) error {
	a := r.args
	out, err := os.OpenFile(a.out, os.O_WRONLY, 0)
	if errors.Is(err, os.ErrNotExist) && prev.OutputLength == 0 {
		out, err = os.OpenFile(a.out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	}
	if err != nil {
		return fmt.Errorf("opening --out to resume: %w", err)
	}
	r.out = out
	fi, err := out.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < prev.OutputLength {
		return fmt.Errorf("cannot resume: %s is %d bytes, shorter than the %d the resume file records", a.out, fi.Size(), prev.OutputLength)
	}
	if err := out.Truncate(prev.OutputLength); err != nil {
		return fmt.Errorf("cutting --out back to the last batch: %w", err)
	}
	if _, err := out.Seek(prev.OutputLength, io.SeekStart); err != nil {
		return err
	}
	if _, err := r.in.Seek(prev.InputOffset, io.SeekStart); err != nil {
		return fmt.Errorf("seeking --in: %w", err)
	}
	r.st, r.resumed = *prev, prev.Records
	r.rr = ctstream.NewReader(r.in, r.text, prev.Records, prev.InputOffset)
	r.rw = ctstream.NewWriter(out, r.text, prev.OutputLength)
	return r.openSkip()
}

// openSkip opens the --skip-failed file for appending. If the resume state
// names the same file, what an abandoned batch appended is cut off.
func (r *rewrapRun) openSkip() error {
	a := r.args
	if a.skip == "" {
		return nil
	}
	f, err := os.OpenFile(a.skip, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("opening --skip-failed: %w", err)
	}
	r.skip = f
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if r.st.SkipFile == a.skip && fi.Size() > r.st.SkipLength {
		if err := f.Truncate(r.st.SkipLength); err != nil {
			return fmt.Errorf("cutting --skip-failed back to the last batch: %w", err)
		}
		return nil
	}
	r.st.SkipFile, r.st.SkipLength = a.skip, fi.Size()
	return nil
}

func (r *rewrapRun) close() {
	for _, f := range []*os.File{r.in, r.out, r.skip} {
		if f != nil {
			f.Close()
		}
	}
}

// loop rewraps batch after batch until the input ends, a record fails, or
// ctx is cancelled.
func (r *rewrapRun) loop(ctx context.Context) error {
	for {
		if ctx.Err() != nil {
			return r.interrupted()
		}
		items, readErr := r.readBatch()
		if len(items) > 0 {
			res, err := r.rewrap(ctx, items)
			if err != nil {
				if ctx.Err() != nil {
					return r.interrupted()
				}
				return r.stopped(err)
			}
			if err := r.commit(items, res); err != nil {
				return r.stopped(err)
			}
		}
		if readErr == io.EOF {
			return nil
		}
		if readErr != nil {
			return r.stopped(readErr)
		}
	}
}

// readBatch reads up to --batch records (fewer at maxRewrapBatchBytes). Its
// error (io.EOF at the end) is about what follows the items returned.
func (r *rewrapRun) readBatch() ([]rewrapItem, error) {
	var items []rewrapItem
	size := 0
	for len(items) < r.args.batch && size < maxRewrapBatchBytes {
		rec, err := r.rr.Next()
		if err != nil {
			return items, err
		}
		it := rewrapItem{orig: rec, ct: rec}
		if r.text {
			if it.ct, it.err = client.FromText(string(rec)); it.err != nil {
				// "malformed ciphertext: why", without the client's prefix
				it.err = errors.New(strings.TrimPrefix(it.err.Error(), "hsmd client: "))
			}
		} else if len(rec) == 0 {
			it.err = errors.New("empty record")
		}
		items = append(items, it)
		size += len(rec)
	}
	return items, nil
}

// rewrap sends the items that could be decoded in one call and returns the
// output record or the error of each item.
func (r *rewrapRun) rewrap(ctx context.Context, items []rewrapItem) ([]client.RewrapResult, error) {
	res := make([]client.RewrapResult, len(items))
	send := make([]client.CiphertextItem, 0, len(items))
	idx := make([]int, 0, len(items))
	for i, it := range items {
		if it.err != nil {
			res[i].Err = it.err
			continue
		}
		send = append(send, client.CiphertextItem{Ciphertext: it.ct, Context: r.args.aad})
		idx = append(idx, i)
	}
	if len(send) == 0 {
		return res, nil
	}
	ctx, cancel := r.args.cf.withTimeout(ctx)
	defer cancel()
	out, _, err := r.c.Rewrap(ctx, r.args.tenant, send)
	if err != nil {
		return nil, clientRPCError("rewrap", err)
	}
	for j, i := range idx {
		res[i] = out[j]
	}
	return res, nil
}

// commit writes a batch to the output, fsyncs it and records the new state.
// Without --skip-failed, a failed item stops the run before anything of the
// batch is written.
func (r *rewrapRun) commit(items []rewrapItem, res []client.RewrapResult) error {
	first := r.st.Records + 1
	if r.skip == nil {
		for i := range res {
			if res[i].Err != nil {
				return r.recordFailed(first+int64(i), res[i].Err)
			}
		}
	}
	skipped, nskip, err := r.writeBatch(items, res)
	if err != nil {
		return err
	}
	if nskip > 0 {
		n, err := r.skip.Write(skipped)
		r.st.SkipLength += int64(n)
		if err == nil {
			err = r.skip.Sync()
		}
		if err != nil {
			return fmt.Errorf("writing --skip-failed: %w", err)
		}
	}
	r.st.Records, r.st.InputOffset, r.st.OutputLength = r.rr.Records(), r.rr.Offset(), r.rw.Written()
	r.st.Skipped += nskip
	r.meter.Set(r.st.Records, r.st.InputOffset)
	if r.args.resume == "" {
		return nil
	}
	return r.st.save(r.args.resume)
}

// writeBatch writes the rewrapped records, and the failed ones unchanged,
// to the output and (with --resume) fsyncs it. It returns the lines for
// --skip-failed and how many there are.
func (r *rewrapRun) writeBatch(items []rewrapItem, res []client.RewrapResult) ([]byte, int64, error) {
	var skipped bytes.Buffer
	var nskip int64
	for i, it := range items {
		rec := it.orig
		switch {
		case res[i].Err != nil:
			fmt.Fprintf(&skipped, "record %d: %s\n", r.st.Records+1+int64(i), itemReason(res[i].Err))
			nskip++
		case r.text:
			rec = []byte(client.ToText(res[i].Ciphertext))
		default:
			rec = res[i].Ciphertext
		}
		if err := r.rw.Put(rec); err != nil {
			return nil, 0, fmt.Errorf("writing --out: %w", err)
		}
	}
	if err := r.rw.Flush(); err != nil {
		return nil, 0, fmt.Errorf("writing --out: %w", err)
	}
	if r.args.resume != "" {
		if err := r.out.Sync(); err != nil {
			return nil, 0, fmt.Errorf("syncing --out: %w", err)
		}
	}
	return skipped.Bytes(), nskip, nil
}

// itemReason says why an item failed, without its content.
func itemReason(err error) string {
	var ie *client.ItemError
	switch {
	case errors.Is(err, client.ErrDecrypt):
		return "decryption failed (wrong tenant or context, or not authentic)"
	case errors.As(err, &ie):
		msg := ie.Message
		if msg == "" {
			msg = ie.Reason
		}
		return fmt.Sprintf("%s (%s)", msg, ie.Code)
	default:
		return err.Error()
	}
}

// recordFailed is the error that stops the run at a failed record.
func (r *rewrapRun) recordFailed(n int64, err error) error {
	e := &ctstream.RecordError{Unit: "record", N: n, Err: errors.New(itemReason(err))}
	hint := "--skip-failed FILE records failed records and copies them unchanged instead of stopping"
	if errors.Is(err, client.ErrKeyDisabled) || errors.Is(err, client.ErrKeyDestroyed) || errors.Is(err, client.ErrKeyRetired) {
		hint = keyStateError(err, r.args.tenant).(interface{ Hint() string }).Hint() + "; or " + hint
	}
	if r.args.resume != "" {
		hint += fmt.Sprintf("; run again with --resume %s to continue from record %d", r.args.resume, r.st.Records+1)
	}
	return withHint(e, hint)
}

// stopped adds to err, unless it has a hint, how to continue.
func (r *rewrapRun) stopped(err error) error {
	var h interface{ Hint() string }
	if errors.As(err, &h) && h.Hint() != "" {
		return err
	}
	if r.args.resume != "" {
		return withHint(err, fmt.Sprintf("run the same command again with --resume %s to continue after record %d", r.args.resume, r.st.Records))
	}
	return withHint(err, fmt.Sprintf("%s is incomplete: delete it, and use --resume FILE next time to be able to continue", r.args.out))
}

func (r *rewrapRun) interrupted() error {
	err := fmt.Errorf("interrupted after %d records", r.st.Records)
	if r.args.resume != "" {
		return withHint(err, fmt.Sprintf("run the same command again with --resume %s to continue", r.args.resume))
	}
	return withHint(err, fmt.Sprintf("%s is incomplete: delete it, and use --resume FILE next time to be able to continue", r.args.out))
}

// finish makes the output durable and records completion.
func (r *rewrapRun) finish() error {
	if err := r.out.Sync(); err != nil {
		return fmt.Errorf("syncing --out: %w", err)
	}
	if err := r.out.Close(); err != nil {
		return fmt.Errorf("closing --out: %w", err)
	}
	r.out = nil
	if r.args.resume == "" {
		return nil
	}
	r.st.Complete = true
	return r.st.save(r.args.resume)
}

// summary prints records, elapsed time and rate of this run.
func (r *rewrapRun) summary(w io.Writer, elapsed time.Duration, rate float64) {
	n := r.st.Records - r.resumed
	s := fmt.Sprintf("hsmd: rewrap: %d records in %s, %.0f items/s", n, elapsed.Round(10*time.Millisecond), rate)
	if r.resumed > 0 {
		s += fmt.Sprintf(" (%d done in all)", r.st.Records)
	}
	if r.st.Skipped > 0 {
		s += fmt.Sprintf("; %d failed records skipped, listed in %s", r.st.Skipped, r.st.SkipFile)
	}
	fmt.Fprintln(w, s)
}
