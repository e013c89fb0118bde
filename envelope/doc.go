// Package envelope seals and opens records under data keys (DEKs) derived
// from an HSM-held root key, in batches, in the format of docs/FORMAT.md.
//
// An Engine takes a Deriver (HMAC-SHA256 under the kdk, inside the HSM) and
// never imports the HSM itself. Encryption reuses a tenant version's current
// seed until one of its limits (items, bytes, age) is reached, so the HSM
// sees one call per new seed, not per item. Decryption groups a batch by
// (tenant, version, seed), derives once per group, and keeps DEKs in a
// bounded LRU cache.
//
// # Errors
//
// Open reports each item on its own. An item that is not a ciphertext fails
// with an error wrapping ErrMalformed; every other failure to open an item
// (a wrong tag, tenant, context or key, an unknown key version) is ErrDecrypt,
// one error that tells an attacker nothing. A key that cannot be derived
// (HSM unavailable) fails with an error wrapping ErrDerive.
//
// # Key erasure
//
// Erasure is best effort. A DEK's raw bytes live in a fixed array that is
// cleared as soon as the AES key schedule is built; the schedule itself lives
// inside crypto/aes, which offers no way to clear it, and is dropped (left to
// the garbage collector) when its cache entry is evicted or expires. Output
// buffers of failed decryptions are cleared. The Go runtime may copy memory
// (stack growth, GC), so no copy is guaranteed gone.
package envelope
