package main

// encrypt --file and decrypt --file: files of any size in the streaming
// format (docs/FORMAT.md, "Streaming files"), in constant memory, through
// client.NewEncryptWriter and client.NewDecryptReader.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/hsmd/hsmd/client"
)

// fileFlags are encrypt's and decrypt's --file and --out.
type fileFlags struct{ in, out string }

func (f *fileFlags) register(fs *flag.FlagSet, verb string) {
	fs.StringVar(&f.in, "file", "", "`path` of a file of any size to "+verb+" in hsmd's streaming format (- for stdin); --timeout then bounds the call to hsmd, not the copy")
	fs.StringVar(&f.out, "out", "", "with --file: `path` to write (- or absent: stdout); written to a temporary file in its directory and renamed only on success")
}

// set says whether --file or --out was given.
func (f *fileFlags) set() bool { return f.in != "" || f.out != "" }

func (f *fileFlags) check(cmd string, text bool) error {
	switch {
	case f.in == "":
		return &usageError{msg: cmd + ": --out needs --file"}
	case text:
		return &usageError{msg: cmd + ": --text does not apply to --file (the file format is binary)"}
	}
	return nil
}

// open dials hsmd and opens the input and the output of a file command;
// done closes all three, discarding the output unless it was committed.
func (f *fileFlags) open(ctx context.Context, env *cliEnv, cf *connFlags) (c *client.Client, src io.ReadCloser, out *output, done func(), err error) {
	if c, err = cf.dial(ctx); err != nil {
		return nil, nil, nil, nil, err
	}
	if src, err = openInput(env, f.in); err != nil {
		c.Close()
		return nil, nil, nil, nil, err
	}
	if out, err = createOutput(ctx, env, f.out); err != nil {
		src.Close()
		c.Close()
		return nil, nil, nil, nil, err
	}
	return c, src, out, func() { out.abort(); src.Close(); c.Close() }, nil
}

// encryptFile is `hsmd encrypt --file IN [--out OUT]`.
func (f *fileFlags) encryptFile(ctx context.Context, env *cliEnv, cf *connFlags, tenant string, aad contextFlag, text bool) error {
	if err := f.check("encrypt", text); err != nil {
		return err
	}
	c, src, out, done, err := f.open(ctx, env, cf)
	if err != nil {
		return err
	}
	defer done()
	rctx, cancel := cf.withTimeout(ctx)
	w, err := c.NewEncryptWriter(rctx, tenant, out, client.StreamOptions{Context: aad})
	cancel()
	if err != nil {
		return clientRPCError("encrypt", err)
	}
	if _, err := io.Copy(w, src); err != nil {
		return fmt.Errorf("encrypt: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("encrypt: %w", err)
	}
	return out.commit()
}

// decryptFile is `hsmd decrypt --file IN [--out OUT]`. With --out the
// plaintext appears only if all of it authenticated; on stdout it streams,
// and a failure says that what came out is incomplete.
func (f *fileFlags) decryptFile(ctx context.Context, env *cliEnv, cf *connFlags, tenant string, aad contextFlag) error {
	if err := f.check("decrypt", false); err != nil {
		return err
	}
	c, src, out, done, err := f.open(ctx, env, cf)
	if err != nil {
		return err
	}
	defer done()
	rctx, cancel := cf.withTimeout(ctx)
	r, err := c.NewDecryptReader(rctx, tenant, src, client.StreamOptions{Context: aad})
	cancel()
	if err != nil {
		return fileDecryptError(err, tenant)
	}
	n, err := io.Copy(out, r)
	if err != nil {
		err = fileDecryptError(err, tenant)
		if out.tmp == nil && n > 0 {
			return withHint(err, fmt.Sprintf("the %d bytes written to stdout before the failure are incomplete and must not be used; --out writes all or nothing", n))
		}
		return err
	}
	return out.commit()
}

// fileDecryptError is the CLI error of a failed streaming decryption.
func fileDecryptError(err error, tenant string) error {
	var ie *client.ItemError
	switch {
	case errors.Is(err, client.ErrDecrypt):
		return errors.New("decryption failed")
	case errors.Is(err, client.ErrMalformed):
		return withHint(errors.New("input is not an hsmd encrypted file"),
			"files are made by `hsmd encrypt --file`; what plain `hsmd encrypt` made decrypts without --file")
	case errors.Is(err, client.ErrKeyDisabled), errors.Is(err, client.ErrKeyDestroyed), errors.Is(err, client.ErrKeyRetired):
		return keyStateError(err, tenant)
	case errors.As(err, &ie):
		return fmt.Errorf("decrypt: %s (%s)", ie.Message, ie.Code)
	}
	return clientRPCError("decrypt", err) // hsmd's status, or an I/O error
}

// openInput opens --file: a path, or - for stdin (which it does not close).
func openInput(env *cliEnv, path string) (io.ReadCloser, error) {
	if path == "-" {
		return io.NopCloser(env.stdin), nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err // names the path and the cause
	}
	return f, nil
}

// output is where --file's result goes: stdout, or a temporary file next
// to --out that commit renames into place (abort removes it). Each write
// first checks ctx, so an interrupt stops a long copy.
type output struct {
	ctx  context.Context
	w    io.Writer
	tmp  *os.File // nil for stdout
	path string
	done bool
}

func createOutput(ctx context.Context, env *cliEnv, path string) (*output, error) {
	if path == "" || path == "-" {
		return &output{ctx: ctx, w: env.stdout}, nil
	}
	// Mode 0600: the plaintext is only the caller's.
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("--out: %w", err)
	}
	return &output{ctx: ctx, w: tmp, tmp: tmp, path: path}, nil
}

func (o *output) Write(p []byte) (int, error) {
	if err := o.ctx.Err(); err != nil {
		return 0, err
	}
	return o.w.Write(p)
}

// commit makes the output durable and puts it in place: fsync, rename,
// fsync the directory.
func (o *output) commit() error {
	if o.tmp == nil {
		return nil
	}
	if err := o.tmp.Sync(); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	if err := o.tmp.Close(); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	if err := os.Rename(o.tmp.Name(), o.path); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	o.done = true
	d, err := os.Open(filepath.Dir(o.path))
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("--out: syncing its directory: %w", err)
	}
	return nil
}

// abort removes the temporary file unless commit renamed it.
func (o *output) abort() {
	if o.tmp != nil && !o.done {
		o.tmp.Close()
		os.Remove(o.tmp.Name())
	}
}
