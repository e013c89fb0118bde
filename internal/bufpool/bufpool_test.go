package bufpool

import "testing"

func TestGetPut(t *testing.T) {
	p := new(Pool)
	for _, n := range []int{0, 1, 255, 256, 257, 4096, 1<<20 + 1, 1 << 22, 1 << 27} {
		b := p.Get(n)
		if len(*b) != n || cap(*b) < n {
			t.Fatalf("Get(%d): len %d cap %d", n, len(*b), cap(*b))
		}
		if c := cap(*b); n > 256 && c >= 2*n {
			t.Fatalf("Get(%d): capacity %d, more than the next power of two", n, c)
		}
		p.Put(b)
	}
	// Above the largest class: exact, and not kept.
	big := p.Get(1<<27 + 1)
	if cap(*big) != 1<<27+1 {
		t.Fatalf("big buffer capacity %d", cap(*big))
	}
	p.Put(big)
	// A buffer of a class size comes back (sync.Pool may drop it, so
	// retry), with the length asked for, not cleared.
	for range 100 {
		b := p.Get(3000)
		(*b)[0] = 42
		p.Put(b)
		if c := p.Get(2500); (*c)[0] == 42 && len(*c) == 2500 {
			return
		}
	}
	t.Fatal("a pooled buffer never came back")
}

func TestPutIgnoresForeignBuffers(t *testing.T) {
	p := new(Pool)
	odd := make([]byte, 1000) // not a power of two
	p.Put(&odd)
	small := make([]byte, 16)
	p.Put(&small)
	if b := p.Get(1000); cap(*b) != 1024 {
		t.Fatalf("Get(1000) capacity %d, want the class's 1024", cap(*b))
	}
}
