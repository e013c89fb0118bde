package store_test

import (
	"reflect"
	"testing"
	"time"

	"github.com/hsmd/hsmd/store"
)

// TestClone: a clone equals its original, and changing any part of it
// (a version, a salt, an X-Wing key) leaves the original as it was.
func TestClone(t *testing.T) {
	orig := &store.Tenant{Name: "a", ID: 7, Current: 1, Revision: 3, CreateTime: time.Unix(1, 0),
		Versions: []store.KeyVersion{{Version: 1, State: store.StateEnabled, Salt: []byte{1, 2}, XWingPublic: []byte{3}, XWingSealed: []byte{4}}}}
	c := orig.Clone()
	if !reflect.DeepEqual(c, orig) {
		t.Fatalf("clone %+v differs from %+v", c, orig)
	}
	c.Versions[0].Salt[0], c.Versions[0].XWingPublic[0], c.Versions[0].XWingSealed[0] = 9, 9, 9
	c.Versions[0].State = store.StateDisabled
	c.Versions = append(c.Versions, store.KeyVersion{Version: 2})
	if orig.Versions[0].Salt[0] != 1 || orig.Versions[0].XWingPublic[0] != 3 || orig.Versions[0].XWingSealed[0] != 4 ||
		orig.Versions[0].State != store.StateEnabled || len(orig.Versions) != 1 {
		t.Fatalf("changing the clone changed the original: %+v", orig)
	}
}
