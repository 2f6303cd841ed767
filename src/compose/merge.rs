//! Shaping one call's JSON, joining per-item results back, and merging the calls into one
//! answer. Everything here runs in declared call order on values that are already complete,
//! so the answer does not depend on which call finished first.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::config::{ArrayMerge, ForEach, OnConflict, Shape};
use super::template::scalar_text;

/// Applies `extract`, `pick`, `omit`, `rename`, `flatten` and `wrap` (in that order).
/// `pick`/`omit`/`rename` apply to an object, or to each object of an array.
pub fn shape(mut v: Value, s: &Shape) -> Result<Value, String> {
    if let Some(p) = &s.extract {
        v = v
            .pointer_mut(p)
            .map(Value::take)
            .ok_or_else(|| format!("nothing at {p:?} to extract"))?;
    }
    if !s.pick.is_empty() || !s.omit.is_empty() || !s.rename.is_empty() {
        match &mut v {
            Value::Object(o) => fields(o, s),
            Value::Array(a) => a.iter_mut().for_each(|e| {
                if let Value::Object(o) = e {
                    fields(o, s)
                }
            }),
            _ => {}
        }
    }
    if s.flatten {
        if let Value::Array(a) = v {
            let mut out = Vec::with_capacity(a.len());
            for e in a {
                match e {
                    Value::Array(inner) => out.extend(inner),
                    other => out.push(other),
                }
            }
            v = Value::Array(out);
        }
    }
    if let Some(w) = &s.wrap {
        let mut m = Map::new();
        m.insert(w.clone(), v);
        v = Value::Object(m);
    }
    Ok(v)
}

fn fields(o: &mut Map<String, Value>, s: &Shape) {
    if !s.pick.is_empty() {
        o.retain(|k, _| s.pick.iter().any(|p| p == k));
    }
    for k in &s.omit {
        o.remove(k);
    }
    for (from, to) in &s.rename {
        if let Some(v) = o.remove(from) {
            o.insert(to.clone(), v);
        }
    }
}

/// The text an id is matched by: a string's content, a number or boolean as JSON writes it;
/// `None` for other values (they are skipped).
pub fn id_key(v: &Value) -> Option<String> {
    match v {
        Value::Null | Value::Array(_) | Value::Object(_) => None,
        other => scalar_text(other).map(|c| c.into_owned()),
    }
}

/// The ids of a `for_each`: the values at `array/*/id` in the source, de-duplicated in order
/// of first appearance.
pub fn items(source: &Value, f: &ForEach) -> Result<Vec<Value>, String> {
    let arr = source
        .pointer(&f.array)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no array at {:?} in the source call's answer", f.array))?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for e in arr {
        let Some(v) = e.pointer(&f.id) else { continue };
        if super::template::inexact(v) {
            // Two such ids could be one double: rounded, they would fetch and join the wrong
            // results.
            // (Not named: written, it would be the rounded number.)
            return Err(format!("an item's id: {}", super::template::INEXACT));
        }
        let Some(k) = id_key(v) else { continue };
        if seen.insert(k) {
            if out.len() == f.max_items {
                return Err(format!(
                    "more than max_items = {} distinct items",
                    f.max_items
                ));
            }
            out.push(v.clone());
        }
    }
    Ok(out)
}

/// Puts each result into the source items it belongs to: `item[into] = result` where
/// `result[key]` equals the item's id. Items without a result are left as they are.
///
/// One result is copied into every item that has its id, and a source may repeat an id in
/// many items: the copies are bounded by `limit` bytes of JSON (the route's
/// `max_total_bytes`), or the join is refused and the source is left as it was.
pub fn join(
    source: &mut Value,
    f: &ForEach,
    results: &[Value],
    limit: usize,
) -> Result<(), String> {
    let Some(j) = &f.join else { return Ok(()) };
    let key_ptr = if j.key.starts_with('/') {
        j.key.clone()
    } else {
        format!("/{}", j.key.replace('~', "~0").replace('/', "~1"))
    };
    // Each result with the length of its JSON text.
    let mut by_id: std::collections::HashMap<String, (&Value, usize)> =
        std::collections::HashMap::new();
    for r in results {
        if let Some(k) = r.pointer(&key_ptr).and_then(id_key) {
            by_id.entry(k).or_insert_with(|| (r, json_len(r)));
        }
    }
    let Some(Value::Array(arr)) = source.pointer_mut(&f.array) else {
        return Ok(());
    };
    let mut total = 0usize;
    for e in arr.iter() {
        let Some(k) = e.pointer(&f.id).and_then(id_key) else {
            continue;
        };
        if let (Some((_, len)), Value::Object(_)) = (by_id.get(&k), e) {
            total = total.saturating_add(*len);
            if total > limit {
                return Err(format!(
                    "its results joined into the source's items would be over max_total_bytes ({limit} bytes)"
                ));
            }
        }
    }
    for e in arr.iter_mut() {
        let Some(k) = e.pointer(&f.id).and_then(id_key) else {
            continue;
        };
        if let (Some((r, _)), Value::Object(o)) = (by_id.get(&k), e) {
            o.insert(j.into.clone(), (*r).clone());
        }
    }
    Ok(())
}

/// The length of `v`'s JSON text.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(b.len());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Counting cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Two calls gave the same key and the route says that is an error.
#[derive(Debug)]
pub struct Conflict {
    pub key: String,
    pub first: usize,
    pub second: usize,
}

/// A value in the answer: a JSON tree, or the bytes of a valid JSON value from an answer that
/// needed no shaping (written as they came, without building a tree).
#[derive(Debug)]
pub enum Piece<'a> {
    Tree(Value),
    Raw(&'a [u8]),
}

impl Piece<'_> {
    fn into_tree(self) -> Value {
        match self {
            Piece::Tree(v) => v,
            // Raw pieces are validated JSON; `Null` is unreachable in practice.
            Piece::Raw(b) => serde_json::from_slice(b).unwrap_or(Value::Null),
        }
    }
}

/// Merges the calls' top-level entries, in declared order, into one object (sorted by key, as
/// serde_json's map is). Each part is a call index and its entries. A key repeated within one
/// call's entries keeps the later value, as a JSON parser would.
pub fn merge<'a>(
    parts: Vec<(usize, Vec<(String, Piece<'a>)>)>,
    policy: OnConflict,
    arrays: ArrayMerge,
) -> Result<BTreeMap<String, Piece<'a>>, Conflict> {
    let mut root: BTreeMap<String, Piece<'a>> = BTreeMap::new();
    // Which call gave each top-level key (for conflict reports).
    let mut owner: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (call, entries) in parts {
        for (k, v) in entries {
            let Some(old) = root.get_mut(&k) else {
                owner.insert(k.clone(), call);
                root.insert(k, v);
                continue;
            };
            let first = owner.get(&k).copied().unwrap_or(call);
            if first == call {
                *old = v;
                continue;
            }
            match policy {
                OnConflict::Error => {
                    return Err(Conflict {
                        first,
                        second: call,
                        key: k,
                    })
                }
                OnConflict::First => {}
                OnConflict::Last => {
                    *old = v;
                    owner.insert(k, call);
                }
                OnConflict::DeepMerge => {
                    let mut a = std::mem::replace(old, Piece::Tree(Value::Null)).into_tree();
                    deep(&mut a, v.into_tree(), arrays);
                    *old = Piece::Tree(a);
                    owner.insert(k, call);
                }
            }
        }
    }
    Ok(root)
}

/// Writes a merged object as JSON: keys in order, trees by serde_json, raw pieces as they are.
pub fn write_object(root: &BTreeMap<String, Piece<'_>>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (n, (k, v)) in root.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        match v {
            Piece::Tree(t) => {
                let _ = serde_json::to_writer(&mut *out, t);
            }
            Piece::Raw(b) => out.extend_from_slice(b),
        }
    }
    out.push(b'}');
}

/// The top-level entries of `doc`, which is valid JSON (checked before): `None` when it is not
/// an object. Values are the exact bytes of each member's value, without surrounding blanks.
pub fn top_level(doc: &[u8]) -> Option<Vec<(String, &[u8])>> {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut i = doc.iter().position(|b| !ws(b))?;
    if doc[i] != b'{' {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        while doc.get(i).is_some_and(ws) {
            i += 1;
        }
        match doc.get(i)? {
            b'}' => return Some(out),
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = string_end(doc, i)?;
        let key: String = serde_json::from_slice(&doc[i..key_end]).ok()?;
        i = key_end;
        while doc.get(i).is_some_and(|b| ws(b) || *b == b':') {
            i += 1;
        }
        let start = i;
        i = value_end(doc, i)?;
        out.push((key, &doc[start..i]));
    }
}

/// The index after the string that starts (with its quote) at `i`.
fn string_end(doc: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', doc.get(i..)?)?;
        match doc[i] {
            b'"' => return Some(i + 1),
            _ => i += 2,
        }
    }
}

/// The index after the (valid) JSON value that starts at `i`. In valid JSON, braces and
/// brackets each balance on their own outside strings, so a container's end is found by
/// counting its own kind only (with `memchr3`, not byte by byte).
fn value_end(doc: &[u8], mut i: usize) -> Option<usize> {
    let (open, close) = match doc.get(i)? {
        b'"' => return string_end(doc, i),
        b'{' => (b'{', b'}'),
        b'[' => (b'[', b']'),
        _ => {
            while doc
                .get(i)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                i += 1;
            }
            return Some(i);
        }
    };
    let mut depth = 0usize;
    loop {
        i += memchr::memchr3(b'"', open, close, doc.get(i..)?)?;
        match doc[i] {
            b'"' => {
                i = string_end(doc, i)?;
                continue;
            }
            c if c == open => depth += 1,
            _ => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
        }
        i += 1;
    }
}

/// A whole valid JSON document without its surrounding blanks.
pub fn trim(doc: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = doc.iter().position(|b| !ws(b)).unwrap_or(doc.len());
    let end = doc.iter().rposition(|b| !ws(b)).map_or(start, |p| p + 1);
    &doc[start..end.max(start)]
}

/// Objects merge key by key, arrays concatenate or are replaced, anything else: `b` wins.
fn deep(a: &mut Value, b: Value, arrays: ArrayMerge) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in y {
                match x.get_mut(&k) {
                    Some(old) => deep(old, v, arrays),
                    None => {
                        x.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if arrays == ArrayMerge::Concat => x.extend(y),
        (a, b) => *a = b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shaping_in_order() {
        let s = Shape {
            extract: Some("/data".into()),
            pick: vec!["a".into(), "b".into()],
            omit: vec!["b".into()],
            rename: vec![("a".into(), "alpha".into())],
            wrap: Some("w".into()),
            ..Shape::default()
        };
        let v = shape(json!({"data": {"a": 1, "b": 2, "c": 3}}), &s).unwrap();
        assert_eq!(v, json!({"w": {"alpha": 1}}));
        assert!(shape(json!({}), &s).is_err());
        let f = Shape {
            flatten: true,
            ..Shape::default()
        };
        assert_eq!(
            shape(json!([[1, 2], 3, [4]]), &f).unwrap(),
            json!([1, 2, 3, 4])
        );
    }

    fn run(policy: OnConflict, arrays: ArrayMerge) -> Result<String, Conflict> {
        let a = json!({"a": {"x": 1, "l": [1]}, "k": 1});
        let b = br#" { "k" : 2, "a":{"y": 2, "l": [2]} , "k": 3 } "#;
        let parts = vec![
            (
                0,
                a.as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), Piece::Tree(v.clone())))
                    .collect(),
            ),
            (
                1,
                top_level(b)
                    .unwrap()
                    .into_iter()
                    .map(|(k, v)| (k, Piece::Raw(v)))
                    .collect(),
            ),
        ];
        let root = merge(parts, policy, arrays)?;
        let mut out = Vec::new();
        write_object(&root, &mut out);
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn each_conflict_policy() {
        let e = run(OnConflict::Error, ArrayMerge::Concat).unwrap_err();
        // The second call's entries in its document's order: "k" comes first there.
        assert_eq!((e.key.as_str(), e.first, e.second), ("k", 0, 1));
        assert_eq!(
            run(OnConflict::First, ArrayMerge::Concat).unwrap(),
            r#"{"a":{"l":[1],"x":1},"k":1}"#
        );
        // Raw pieces keep their own bytes; the second call's repeated "k" keeps its last value.
        assert_eq!(
            run(OnConflict::Last, ArrayMerge::Concat).unwrap(),
            r#"{"a":{"y": 2, "l": [2]},"k":3}"#
        );
        assert_eq!(
            run(OnConflict::DeepMerge, ArrayMerge::Concat).unwrap(),
            r#"{"a":{"l":[1,2],"x":1,"y":2},"k":3}"#
        );
        assert_eq!(
            run(OnConflict::DeepMerge, ArrayMerge::Replace).unwrap(),
            r#"{"a":{"l":[2],"x":1,"y":2},"k":3}"#
        );
    }

    #[test]
    fn top_level_entries_of_valid_json() {
        let doc =
            br#"{"a\"b": "x,}", "n": -1.5e3, "o": {"p": [1, {"q": "]"}]}, "t": true, "z": null}"#;
        let e = top_level(doc).unwrap();
        let got: Vec<(String, &str)> = e
            .iter()
            .map(|(k, v)| (k.clone(), std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a\"b".to_string(), r#""x,}""#),
                ("n".to_string(), "-1.5e3"),
                ("o".to_string(), r#"{"p": [1, {"q": "]"}]}"#),
                ("t".to_string(), "true"),
                ("z".to_string(), "null"),
            ]
        );
        // Every entry parses to what serde_json makes of the member, however strings nest
        // brackets and escapes.
        for doc in [
            r#"{"a":"\\\\","b":"}{][\"","c":[{"d":"]"},[[]],{}],"e":{"f":["}",{"g":"{"}]},"h":-0.5}"#,
            r#"  {  "x" : [ 1 , [ 2 , { "y" : "\u005d" } ] ] , "z" : { } }  "#,
        ] {
            let want: serde_json::Map<String, Value> = serde_json::from_str(doc).unwrap();
            let got = top_level(doc.as_bytes()).unwrap();
            assert_eq!(got.len(), want.len(), "{doc}");
            for (k, v) in got {
                let v: Value = serde_json::from_slice(v).unwrap();
                assert_eq!(Some(&v), want.get(&k), "{doc}: {k}");
            }
        }
        assert!(top_level(b" [1]").is_none());
        assert_eq!(top_level(b" {} ").unwrap().len(), 0);
        assert_eq!(trim(b" \n[1, 2]\t"), b"[1, 2]");
    }

    #[test]
    fn items_dedupe_bound_and_join() {
        let f = |max| ForEach {
            source: 0,
            array: "/orders".into(),
            id: "/pid".into(),
            max_items: max,
            concurrency: 1,
            batch: 1,
            batch_as: Default::default(),
            batch_param: None,
            join: Some(super::super::config::JoinConfig {
                key: "id".into(),
                into: "product".into(),
            }),
        };
        let mut src =
            json!({"orders": [{"pid": 7}, {"pid": "8"}, {"pid": 7}, {"x": 1}, {"pid": null}]});
        // Two copies of a 25-byte result: over a 40-byte limit, refused, nothing changed.
        let before = src.clone();
        let e = join(&mut src, &f(10), &[json!({"id": "7", "n": "seven"})], 40).unwrap_err();
        assert!(e.contains("max_total_bytes"), "{e}");
        assert_eq!(src, before);
        assert_eq!(items(&src, &f(10)).unwrap(), vec![json!(7), json!("8")]);
        assert!(items(&src, &f(1)).unwrap_err().contains("max_items"));
        join(&mut src, &f(10), &[json!({"id": "7", "n": "seven"})], 1024).unwrap();
        assert_eq!(src["orders"][0]["product"]["n"], "seven");
        assert_eq!(src["orders"][2]["product"]["n"], "seven");
        assert!(src["orders"][1].get("product").is_none());
    }
}
