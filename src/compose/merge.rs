//! Shaping one call's JSON, joining per-item results back, and merging the calls into one
//! answer. Everything here runs in declared call order on values that are already complete,
//! so the answer does not depend on which call finished first.

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
pub fn join(source: &mut Value, f: &ForEach, results: &[Value]) {
    let Some(j) = &f.join else { return };
    let key_ptr = if j.key.starts_with('/') {
        j.key.clone()
    } else {
        format!("/{}", j.key.replace('~', "~0").replace('/', "~1"))
    };
    let mut by_id: std::collections::HashMap<String, &Value> = std::collections::HashMap::new();
    for r in results {
        if let Some(k) = r.pointer(&key_ptr).and_then(id_key) {
            by_id.entry(k).or_insert(r);
        }
    }
    let Some(Value::Array(arr)) = source.pointer_mut(&f.array) else {
        return;
    };
    for e in arr.iter_mut() {
        let Some(k) = e.pointer(&f.id).and_then(id_key) else {
            continue;
        };
        if let (Some(r), Value::Object(o)) = (by_id.get(&k), e) {
            o.insert(j.into.clone(), (*r).clone());
        }
    }
}

/// Two calls gave the same key and the route says that is an error.
#[derive(Debug)]
pub struct Conflict {
    pub key: String,
    pub first: usize,
    pub second: usize,
}

/// Merges the calls' values, in declared order, into one object. Each part is
/// (call index, `into` key or None for the root, value). A root value must be an object.
pub fn merge(
    parts: Vec<(usize, Option<&str>, Value)>,
    policy: OnConflict,
    arrays: ArrayMerge,
) -> Result<Map<String, Value>, Conflict> {
    let mut root = Map::new();
    // Which call gave each top-level key (for conflict reports).
    let mut owner: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (call, into, v) in parts {
        let entries: Vec<(String, Value)> = match (into, v) {
            (Some(k), v) => vec![(k.to_string(), v)],
            (None, Value::Object(o)) => o.into_iter().collect(),
            // Checked by the caller.
            (None, _) => continue,
        };
        for (k, v) in entries {
            match root.get_mut(&k) {
                None => {
                    owner.insert(k.clone(), call);
                    root.insert(k, v);
                }
                Some(old) => match policy {
                    OnConflict::Error => {
                        return Err(Conflict {
                            first: owner.get(&k).copied().unwrap_or(call),
                            second: call,
                            key: k,
                        })
                    }
                    OnConflict::First => {}
                    OnConflict::Last => {
                        *old = v;
                        owner.insert(k, call);
                    }
                    OnConflict::DeepMerge => deep(old, v, arrays),
                },
            }
        }
    }
    Ok(root)
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

    #[test]
    fn each_conflict_policy() {
        let parts = || {
            vec![
                (0, None, json!({"a": {"x": 1, "l": [1]}, "k": 1})),
                (1, None, json!({"a": {"y": 2, "l": [2]}, "k": 2})),
            ]
        };
        let e = merge(parts(), OnConflict::Error, ArrayMerge::Concat).unwrap_err();
        assert_eq!((e.key.as_str(), e.first, e.second), ("a", 0, 1));
        let f = merge(parts(), OnConflict::First, ArrayMerge::Concat).unwrap();
        assert_eq!(Value::Object(f), json!({"a": {"x": 1, "l": [1]}, "k": 1}));
        let l = merge(parts(), OnConflict::Last, ArrayMerge::Concat).unwrap();
        assert_eq!(Value::Object(l), json!({"a": {"y": 2, "l": [2]}, "k": 2}));
        let d = merge(parts(), OnConflict::DeepMerge, ArrayMerge::Concat).unwrap();
        assert_eq!(
            Value::Object(d),
            json!({"a": {"x": 1, "y": 2, "l": [1, 2]}, "k": 2})
        );
        let r = merge(parts(), OnConflict::DeepMerge, ArrayMerge::Replace).unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"a": {"x": 1, "y": 2, "l": [2]}, "k": 2})
        );
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
        assert_eq!(items(&src, &f(10)).unwrap(), vec![json!(7), json!("8")]);
        assert!(items(&src, &f(1)).unwrap_err().contains("max_items"));
        join(&mut src, &f(10), &[json!({"id": "7", "n": "seven"})]);
        assert_eq!(src["orders"][0]["product"]["n"], "seven");
        assert_eq!(src["orders"][2]["product"]["n"], "seven");
        assert!(src["orders"][1].get("product").is_none());
    }
}
