package server

import (
	"context"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"
)

// PeerCredAuthInfo is the identity of a caller on a unix socket: the
// kernel's SO_PEERCRED of the connecting process.
type PeerCredAuthInfo struct {
	credentials.CommonAuthInfo
	UID, GID uint32
	PID      int32
}

// AuthType implements credentials.AuthInfo.
func (PeerCredAuthInfo) AuthType() string { return "peercred" }

// PeerCredentials returns transport credentials that authenticate unix
// socket callers by their peer credentials (uid, gid, pid) and pass other
// connections through unchanged (insecure: loopback only; the mTLS issue
// replaces them).
func PeerCredentials() credentials.TransportCredentials {
	return peerCreds{insecure.NewCredentials()}
}

type peerCreds struct {
	credentials.TransportCredentials
}

func (p peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return p.TransportCredentials.ServerHandshake(conn)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, nil, err
	}
	if serr != nil {
		return nil, nil, fmt.Errorf("server: SO_PEERCRED: %w", serr)
	}
	return conn, PeerCredAuthInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		UID:            cred.Uid, GID: cred.Gid, PID: cred.Pid,
	}, nil
}

func (p peerCreds) Clone() credentials.TransportCredentials {
	return peerCreds{p.TransportCredentials.Clone()}
}

// callerIdentity names the caller of the call in ctx for the audit log:
// "unix:uid=U,gid=G" on the unix socket; with a verified client
// certificate its first URI SAN ("spiffe://…") or else "cn:NAME";
// "tcp:ADDRESS" otherwise.
func callerIdentity(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "unknown"
	}
	if ai, ok := p.AuthInfo.(PeerCredAuthInfo); ok {
		return fmt.Sprintf("unix:uid=%d,gid=%d", ai.UID, ai.GID)
	}
	if id := certIdentity(p.AuthInfo); id != "" {
		return id
	}
	if p.Addr != nil {
		return p.Addr.Network() + ":" + p.Addr.String()
	}
	return "unknown"
}

// maxIdentity bounds an identity taken from a client certificate.
const maxIdentity = 1024

// certIdentity is the identity of a verified client certificate: its first
// URI SAN, else "cn:" and its subject CN; "" without one.
func certIdentity(ai credentials.AuthInfo) string {
	ti, ok := ai.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.PeerCertificates) == 0 {
		return ""
	}
	c := ti.State.PeerCertificates[0]
	if len(c.URIs) > 0 {
		return clip(c.URIs[0].String(), maxIdentity)
	}
	if c.Subject.CommonName != "" {
		return "cn:" + clip(c.Subject.CommonName, maxIdentity)
	}
	return ""
}

// matchIdentities are the identities of the caller of the call in ctx that
// an authorization policy matches: "uid:U" and "gid:G" on the unix socket,
// the certificate identity (see certIdentity) with mutual TLS, none
// otherwise.
func matchIdentities(ctx context.Context) []string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	if ai, ok := p.AuthInfo.(PeerCredAuthInfo); ok {
		return []string{fmt.Sprintf("uid:%d", ai.UID), fmt.Sprintf("gid:%d", ai.GID)}
	}
	if id := certIdentity(p.AuthInfo); id != "" {
		return []string{id}
	}
	return nil
}
