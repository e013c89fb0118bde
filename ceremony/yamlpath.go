package ceremony

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// PathError is a problem in a ceremony file, at a YAML path such as
// "custody.custodians[2].recipient".
type PathError struct {
	Path string
	Line int
	Msg  string
}

func (e *PathError) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("line %d: %s", e.Line, e.Msg)
	}
	return fmt.Sprintf("%s (line %d): %s", e.Path, e.Line, e.Msg)
}

// decodeStrict decodes one YAML document into out (a pointer to a
// struct), refusing unknown keys, repeated keys and trailing documents,
// and naming the YAML path of the first problem.
func decodeStrict(b []byte, out any) error {
	dec := yaml.NewDecoder(bytes.NewReader(b))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return &PathError{Line: 1, Msg: "empty document"}
		}
		return fmt.Errorf("ceremony file: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return &PathError{Line: extra.Line, Msg: "more than one YAML document"}
	}
	if len(doc.Content) != 1 {
		return &PathError{Line: doc.Line, Msg: "empty document"}
	}
	return walk(doc.Content[0], reflect.ValueOf(out).Elem(), "")
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// walk checks node against the Go value v's shape, then decodes scalars.
func walk(n *yaml.Node, v reflect.Value, path string) error {
	if n.Kind == yaml.AliasNode {
		return &PathError{Path: path, Line: n.Line, Msg: "aliases are not allowed"}
	}
	switch v.Kind() {
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[yaml.Node]() {
			v.Set(reflect.ValueOf(*n))
			return nil
		}
		if n.Kind != yaml.MappingNode {
			return &PathError{Path: path, Line: n.Line, Msg: "expected a mapping"}
		}
		fields := map[string]int{}
		for i := range v.NumField() {
			tag, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("yaml"), ",")
			if tag != "" && tag != "-" {
				fields[tag] = i
			}
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			p := join(path, k.Value)
			if seen[k.Value] {
				return &PathError{Path: p, Line: k.Line, Msg: "repeated key"}
			}
			seen[k.Value] = true
			fi, ok := fields[k.Value]
			if !ok {
				return &PathError{Path: p, Line: k.Line, Msg: "unknown key"}
			}
			if err := walk(val, v.Field(fi), p); err != nil {
				return err
			}
		}
		return nil
	case reflect.Slice:
		if v.Type().Elem().Kind() == reflect.Uint8 {
			break // []byte: a scalar
		}
		if n.Kind != yaml.SequenceNode {
			return &PathError{Path: path, Line: n.Line, Msg: "expected a list"}
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, c := range n.Content {
			if err := walk(c, s.Index(i), path+"["+strconv.Itoa(i)+"]"); err != nil {
				return err
			}
		}
		v.Set(s)
		return nil
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return &PathError{Path: path, Line: n.Line, Msg: "expected a mapping"}
		}
		m := reflect.MakeMap(v.Type())
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			p := join(path, k.Value)
			if m.MapIndex(reflect.ValueOf(k.Value)).IsValid() {
				return &PathError{Path: p, Line: k.Line, Msg: "repeated key"}
			}
			ev := reflect.New(v.Type().Elem()).Elem()
			if err := walk(val, ev, p); err != nil {
				return err
			}
			m.SetMapIndex(reflect.ValueOf(k.Value), ev)
		}
		v.Set(m)
		return nil
	case reflect.Pointer:
		nv := reflect.New(v.Type().Elem())
		if err := walk(n, nv.Elem(), path); err != nil {
			return err
		}
		v.Set(nv)
		return nil
	}
	if n.Kind != yaml.ScalarNode {
		return &PathError{Path: path, Line: n.Line, Msg: "expected a single value"}
	}
	if err := n.Decode(v.Addr().Interface()); err != nil {
		msg := err.Error()
		if te := (*yaml.TypeError)(nil); errors.As(err, &te) && len(te.Errors) > 0 {
			msg = te.Errors[0]
			if _, after, ok := strings.Cut(msg, ": "); ok {
				msg = after
			}
		}
		return &PathError{Path: path, Line: n.Line, Msg: msg}
	}
	return nil
}
