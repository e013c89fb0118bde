package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// failoverServiceConfig makes a client of several replicas use one at a
// time (pick_first: the first that answers, the next when it fails) and
// retry an Envelope call that failed with UNAVAILABLE, as when the replica
// it went to died: encryption, decryption and rewrapping change nothing
// on the server, so a retry on another replica is safe. Key and tenant
// management calls are never retried: the caller decides.
const failoverServiceConfig = `{
  "loadBalancingConfig": [{"pick_first": {}}],
  "methodConfig": [{
    "name": [{"service": "hsmd.v1.Envelope"}],
    "retryPolicy": {
      "maxAttempts": 4,
      "initialBackoff": "0.05s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}`

// dialTarget returns the gRPC target of addr and the dial options it
// needs: transport credentials (see Dial), and for a unix socket a dialer
// of its path. addr may list several TCP addresses of replicas of one
// cluster, separated by commas ("hsmd-a:7443,hsmd-b:7443"): the client
// then uses one at a time and fails over to the next.
func dialTarget(list string, o *options) (string, []grpc.DialOption, error) {
	parts := strings.Split(list, ",")
	as := make([]addr, len(parts))
	for i, p := range parts {
		a, err := parseAddr(strings.TrimSpace(p))
		if err != nil {
			return "", nil, err
		}
		if len(parts) > 1 && a.network != "tcp" {
			return "", nil, fmt.Errorf("hsmd client: address %q: a list of addresses must be TCP host:port only", list)
		}
		as[i] = a
	}
	creds := o.creds
	if o.tls != nil && as[0].network == "tcp" {
		if len(as) == 1 {
			creds = o.tls.credentials(as[0].address)
		} else {
			// Each address is checked against its own host (the
			// resolver's ServerName), unless ServerName is set.
			creds = o.tls.credentials("")
		}
	}
	if creds == nil {
		for _, a := range as {
			if a.network == "tcp" && !a.loopback {
				return "", nil, fmt.Errorf("hsmd client: refusing plaintext TCP to non-loopback address %q: use WithTLS or WithTransportCredentials", a.address)
			}
		}
		creds = insecure.NewCredentials()
	}
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	a := as[0]
	switch {
	case a.network == "unix":
		path := a.address
		// Dial the path ourselves: gRPC's unix resolver mangles paths that
		// are not valid URL paths, and rejects "unix://./rel".
		dopts = append(dopts, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
		return "passthrough:///localhost", dopts, nil
	case len(as) == 1:
		return "dns:///" + a.address, dopts, nil
	}
	var b [8]byte
	rand.Read(b[:])
	r := manual.NewBuilderWithScheme("hsmd-" + hex.EncodeToString(b[:]))
	state := resolver.State{}
	for _, a := range as {
		host, _, _ := net.SplitHostPort(a.address)
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a.address, ServerName: host})
	}
	r.InitialState(state)
	dopts = append(dopts, grpc.WithResolvers(r), grpc.WithDefaultServiceConfig(failoverServiceConfig))
	return r.Scheme() + ":///replicas", dopts, nil
}
