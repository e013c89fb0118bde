// Package kmsv2e2e holds only tests: hsmd's Kubernetes KMS v2 plugin
// driven by kube-apiserver's own code (k8s.io/apiserver's encryption
// configuration loader, its KMS v2 gRPC client and envelope transformer).
//
// It is a package of its own so that the heavy k8s.io/apiserver
// dependency is built for these tests only, never for hsmd.
package kmsv2e2e
