//! A small JSON Schema checker for results.json: the keywords
//! bench/isolation.schema.json uses (`type`, `required`, `properties`,
//! `additionalProperties`, `items`, `enum`, `minimum`, `exclusiveMinimum`,
//! `$ref` to `#/$defs/...`), so the file is standard JSON Schema that any validator
//! also reads.

use serde_json::Value;

/// The schema of results.json.
pub const SCHEMA: &str = include_str!("../../isolation.schema.json");

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        _ => false,
    }
}

fn check(root: &Value, s: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        match r
            .strip_prefix("#/$defs/")
            .and_then(|n| root["$defs"].get(n))
        {
            Some(def) => check(root, def, v, at, errs),
            None => errs.push(format!("{at}: unknown $ref {r}")),
        }
        return;
    }
    if let Some(t) = s.get("type") {
        let ok = match t {
            Value::String(t) => type_ok(t, v),
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(|t| type_ok(t, v)),
            _ => true,
        };
        if !ok {
            errs.push(format!("{at}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!(
                "{at}: {v} is not one of {}",
                Value::Array(e.clone())
            ));
        }
    }
    if let (Some(m), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < m {
            errs.push(format!("{at}: {x} < minimum {m}"));
        }
    }
    let exclusive = s.get("exclusiveMinimum").and_then(Value::as_f64);
    if let (Some(m), Some(x)) = (exclusive, v.as_f64()) {
        if x <= m {
            errs.push(format!("{at}: {x} <= exclusive minimum {m}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for k in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(k) = k.as_str() {
                if !obj.contains_key(k) {
                    errs.push(format!("{at}: missing {k:?}"));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, x) in obj {
            let here = format!("{at}/{k}");
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(ps), _) => check(root, ps, x, &here, errs),
                (None, Some(Value::Bool(false))) => errs.push(format!("{at}: unexpected {k:?}")),
                (None, Some(extra)) if extra.is_object() => check(root, extra, x, &here, errs),
                _ => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(root, items, x, &format!("{at}/{i}"), errs);
        }
    }
}

/// Every place where `v` breaks `schema`; empty if it validates.
pub fn validate(schema: &Value, v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check(schema, schema, v, "", &mut errs);
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_subset_catches_what_it_claims() {
        let s = json!({
            "type": "object", "required": ["a"], "additionalProperties": false,
            "properties": {
                "a": {"type": "array", "items": {"$ref": "#/$defs/n"}},
                "b": {"enum": ["x", "y"]},
                "c": {"type": ["string", "null"]},
                "d": {"type": "object", "additionalProperties": {"type": "integer"}},
                "f": {"type": "number", "exclusiveMinimum": 0}
            },
            "$defs": {"n": {"type": "number", "minimum": 0}}
        });
        assert!(validate(
            &s,
            &json!({"a": [1, 2.5], "b": "x", "c": null, "d": {"k": 3}, "f": 0.05})
        )
        .is_empty());
        let errs = validate(
            &s,
            &json!({"a": [-1, "z"], "b": "q", "c": 1, "d": {"k": 1.5}, "e": 0, "f": 0}),
        );
        assert_eq!(errs.len(), 7, "{errs:#?}");
        assert_eq!(
            validate(&s, &json!({})),
            ["missing \"a\""].map(|e| format!(": {e}"))
        );
    }

    #[test]
    fn the_shipped_schema_parses() {
        let s: Value = serde_json::from_str(SCHEMA).unwrap();
        assert_eq!(s["type"], "object");
    }
}
