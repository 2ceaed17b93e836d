//! Structural-schema handling for custom resources: pruning of unknown fields, defaulting,
//! OpenAPI v3 validation with the API server's messages, and CEL rules through `kube-cel`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{Cause, show_value, type_name};

/// Fields of `metav1.ObjectMeta`; anything else under `metadata` is pruned.
pub const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Compiled `pattern`s, shared by all schemas (patterns repeat a lot across a CRD).
fn pattern(p: &str) -> Option<Regex> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(p.to_string())
        .or_insert_with(|| Regex::new(p).ok())
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Typed conversion (server-side apply)

/// What server-side apply's conversion of an applied configuration to a typed value against the
/// schema reports, worded as structured-merge-diff words it (`.status.x: field not declared in
/// schema`, `.spec.n: expected numeric (int or float), got string`). `apiVersion`, `kind` and
/// `metadata` at the root are not checked.
pub fn typed_errors(schema: &Value, obj: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(map) = obj.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
        for (k, v) in map {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            match props.and_then(|p| p.get(k)) {
                Some(sub) => typed(sub, v, &format!(".{k}"), &mut errs),
                None if preserve => {}
                None => errs.push(format!(".{k}: field not declared in schema")),
            }
        }
    }
    errs
}

/// Go's `%T` of a decoded JSON value.
fn go_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "<nil>",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float64",
        Value::Number(_) => "int64",
        Value::String(_) => "string",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    }
}

/// Go's `%v` of a decoded JSON value.
fn go_value(v: &Value) -> String {
    match v {
        Value::Null => "<nil>".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(go_value).collect();
            format!("[{}]", parts.join(" "))
        }
        Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, x)| format!("{k}:{}", go_value(x)))
                .collect();
            format!("map[{}]", parts.join(" "))
        }
        other => other.to_string(),
    }
}

fn typed(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() || flag(schema, "x-kubernetes-int-or-string") {
        return;
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or(
        if props.is_some() || additional.is_some() {
            "object"
        } else {
            ""
        },
    );
    // structured-merge-diff prints the value with %#v, %T or %v depending on the check.
    let mut wrong = |expected: &str| {
        errs.push(format!(
            "{path}: expected {expected}, got &{{{}}}",
            go_value(v)
        ));
    };
    match ty {
        "string" if !v.is_string() => errs.push(format!(
            "{path}: expected string, got &value.valueUnstructured{{Value:{}}}",
            match v {
                Value::String(s) => format!("{s:?}"),
                other => go_value(other),
            }
        )),
        "integer" | "number" if !v.is_number() => errs.push(format!(
            "{path}: expected numeric (int or float), got {}",
            go_type(v)
        )),
        "boolean" if !v.is_boolean() => wrong("boolean"),
        "array" => match v.as_array() {
            None => wrong("list"),
            Some(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        typed(item_schema, item, &format!("{path}[{i}]"), errs);
                    }
                }
            }
        },
        "object" => match v.as_object() {
            None => wrong("map"),
            Some(map) => {
                let open = flag(schema, "x-kubernetes-preserve-unknown-fields")
                    || flag(schema, "x-kubernetes-embedded-resource");
                for (k, val) in map {
                    let sub = format!("{path}.{k}");
                    match (props.and_then(|p| p.get(k)), additional) {
                        (Some(s), _) => typed(s, val, &sub, errs),
                        (None, Some(a)) if a.is_object() => typed(a, val, &sub, errs),
                        (None, Some(Value::Bool(true))) => {}
                        _ if open => {}
                        _ => errs.push(format!("{sub}: field not declared in schema")),
                    }
                }
            }
        },
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Pruning

/// Removes fields the schema does not declare, returning their paths (`spec.foo`) for
/// `fieldValidation=Strict|Warn`. `apiVersion`, `kind` and `metadata` (pruned to ObjectMeta's
/// fields) are kept at the root.
pub fn prune_root(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    let Some(map) = obj.as_object_mut() else {
        return unknown;
    };
    if let Some(meta) = map.get_mut("metadata") {
        prune_meta(meta, "metadata", &mut unknown);
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&k)) {
            Some(sub) => {
                if let Some(v) = map.get_mut(&k) {
                    prune(sub, v, &k, &mut unknown);
                }
            }
            None if preserve => {}
            None => {
                map.remove(&k);
                unknown.push(k);
            }
        }
    }
    unknown.sort();
    unknown
}

fn prune_meta(meta: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if let Some(m) = meta.as_object_mut() {
        let extra: Vec<String> = m
            .keys()
            .filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in extra {
            m.remove(&k);
            unknown.push(join(path, &k));
        }
    }
}

fn prune(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = flag(schema, "x-kubernetes-embedded-resource");
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let is_object_schema = props.is_some()
                || additional.is_some()
                || schema.get("type").and_then(Value::as_str) == Some("object");
            if !is_object_schema {
                return;
            }
            if embedded && let Some(meta) = map.get_mut("metadata") {
                prune_meta(meta, &join(path, "metadata"), unknown);
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                if embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub_path = join(path, &k);
                if let Some(sub) = props.and_then(|p| p.get(&k)) {
                    if let Some(v) = map.get_mut(&k) {
                        prune(sub, v, &sub_path, unknown);
                    }
                    continue;
                }
                match additional {
                    Some(Value::Object(_)) => {
                        if let (Some(sub), Some(v)) = (additional, map.get_mut(&k)) {
                            prune(sub, v, &sub_path, unknown);
                        }
                    }
                    Some(Value::Bool(true)) => {}
                    _ if preserve => {}
                    _ => {
                        map.remove(&k);
                        unknown.push(sub_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    prune(item_schema, v, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Defaulting

/// Applies `default`s top-down: a missing property with a default gets it (and then its own
/// nested defaults); non-nullable `null`s are dropped first, as the API server does.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, sub) in props {
                    if map.get(k).is_some_and(Value::is_null) && !flag(sub, "nullable") {
                        map.remove(k);
                    }
                    if !map.contains_key(k)
                        && let Some(d) = sub.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                    if let Some(v) = map.get_mut(k) {
                        apply_defaults(sub, v);
                    }
                }
            }
            if let Some(sub @ Value::Object(_)) = schema.get("additionalProperties") {
                for v in map.values_mut() {
                    apply_defaults(sub, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for v in items.iter_mut() {
                    apply_defaults(sub, v);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn is_integer(n: &serde_json::Number) -> bool {
    n.is_i64()
        || n.is_u64()
        || n.as_f64()
            .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
}

fn type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => matches!(v, Value::Number(n) if is_integer(n)),
        "number" => v.is_number(),
        _ => true,
    }
}

fn date_time_ok(s: &str) -> bool {
    static RE: OnceLock<Option<Regex>> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"^\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?)?$",
        )
        .ok()
    })
    .as_ref()
    .is_none_or(|re| re.is_match(s))
}

fn invalid(path: &str, v: &Value, detail: String) -> Cause {
    Cause::new(
        "FieldValueInvalid",
        path,
        format!("Invalid value: {}: {detail}", show_value(v)),
    )
}

fn num_str(v: &Value) -> String {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
            .map(|f| format!("{}", f as i64))
            .unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

/// Validates `value` at `path` against an OpenAPI v3 (structural) schema node.
pub fn validate(schema: &Value, value: &Value, path: &str, errs: &mut Vec<Cause>) {
    let display = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if flag(schema, "nullable") {
            return;
        }
        if let Some(ty) = schema.get("type").and_then(Value::as_str) {
            errs.push(Cause::new(
                "FieldValueTypeInvalid",
                path,
                format!(
                    "Invalid value: \"null\": {display} in body must be of type {ty}: \"null\""
                ),
            ));
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(value.is_string() || matches!(value, Value::Number(n) if is_integer(n))) {
            let t = type_name(value);
            errs.push(Cause::new(
                "FieldValueTypeInvalid",
                path,
                format!(
                    "Invalid value: \"{t}\": {display} in body must be of type integer,string: \"{t}\""
                ),
            ));
            return;
        }
    } else if let Some(ty) = schema.get("type").and_then(Value::as_str)
        && !type_ok(ty, value)
    {
        let t = type_name(value);
        errs.push(Cause::new(
            "FieldValueTypeInvalid",
            path,
            format!("Invalid value: \"{t}\": {display} in body must be of type {ty}: \"{t}\""),
        ));
        return;
    }

    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(show_value).collect();
        errs.push(Cause::new(
            "FieldValueNotSupported",
            path,
            format!(
                "Unsupported value: {}: supported values: {}",
                show_value(value),
                list.join(", ")
            ),
        ));
    }

    match value {
        Value::String(s) => validate_string(schema, value, s, path, display, errs),
        Value::Number(n) => validate_number(schema, value, n, path, display, errs),
        Value::Array(items) => validate_array(schema, value, items, path, display, errs),
        Value::Object(map) => validate_object(schema, value, map, path, display, errs),
        _ => {}
    }

    validate_combinators(schema, value, path, display, errs);
}

fn validate_string(
    schema: &Value,
    value: &Value,
    s: &str,
    path: &str,
    display: &str,
    errs: &mut Vec<Cause>,
) {
    let len = s.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        errs.push(Cause::new(
            "FieldValueTooLong",
            path,
            format!("Too long: may not be more than {max} bytes"),
        ));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        errs.push(invalid(
            path,
            value,
            format!("{display} in body should be at least {min} chars long"),
        ));
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str)
        && let Some(re) = pattern(p)
        && !re.is_match(s)
    {
        errs.push(invalid(
            path,
            value,
            format!("{display} in body should match '{p}'"),
        ));
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") && !date_time_ok(s) {
        errs.push(invalid(
            path,
            value,
            format!(
                "{display} in body must be of type date-time: {}",
                show_value(value)
            ),
        ));
    }
}

fn validate_number(
    schema: &Value,
    value: &Value,
    n: &serde_json::Number,
    path: &str,
    display: &str,
    errs: &mut Vec<Cause>,
) {
    let Some(x) = n.as_f64() else { return };
    if let Some(min_v) = schema.get("minimum")
        && let Some(min) = min_v.as_f64()
    {
        let excl = flag(schema, "exclusiveMinimum");
        if (excl && x <= min) || (!excl && x < min) {
            let rel = if excl {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errs.push(invalid(
                path,
                value,
                format!("{display} in body should be {rel} {}", num_str(min_v)),
            ));
        }
    }
    if let Some(max_v) = schema.get("maximum")
        && let Some(max) = max_v.as_f64()
    {
        let excl = flag(schema, "exclusiveMaximum");
        if (excl && x >= max) || (!excl && x > max) {
            let rel = if excl {
                "less than"
            } else {
                "less than or equal to"
            };
            errs.push(invalid(
                path,
                value,
                format!("{display} in body should be {rel} {}", num_str(max_v)),
            ));
        }
    }
    if let Some(m_v) = schema.get("multipleOf")
        && let Some(m) = m_v.as_f64()
        && m > 0.0
        && (x / m).fract().abs() > 1e-9
    {
        errs.push(invalid(
            path,
            value,
            format!("{display} in body should be a multiple of {}", num_str(m_v)),
        ));
    }
}

fn validate_array(
    schema: &Value,
    value: &Value,
    items: &[Value],
    path: &str,
    display: &str,
    errs: &mut Vec<Cause>,
) {
    let len = items.len() as u64;
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && len > max
    {
        errs.push(Cause::new(
            "FieldValueTooMany",
            path,
            format!("Too many: {len}: must have at most {max} items"),
        ));
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && len < min
    {
        errs.push(invalid(
            path,
            &Value::from(len),
            format!("{display} in body should have at least {min} items"),
        ));
    }
    let _ = value;
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            for (i, v) in items.iter().enumerate() {
                if items[..i].contains(v) {
                    errs.push(Cause::new(
                        "FieldValueDuplicate",
                        format!("{path}[{i}]"),
                        format!("Duplicate value: {}", show_value(v)),
                    ));
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let key_of = |v: &Value| -> Vec<Value> {
                keys.iter()
                    .map(|k| v.get(*k).cloned().unwrap_or(Value::Null))
                    .collect()
            };
            for (i, v) in items.iter().enumerate() {
                let k = key_of(v);
                if items[..i].iter().any(|o| key_of(o) == k) {
                    let shown: Vec<String> = keys
                        .iter()
                        .zip(&k)
                        .map(|(name, val)| format!("\"{name}\":{}", show_value(val)))
                        .collect();
                    errs.push(Cause::new(
                        "FieldValueDuplicate",
                        format!("{path}[{i}]"),
                        format!(
                            "Duplicate value: map[string]interface {{}}{{{}}}",
                            shown.join(", ")
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, v) in items.iter().enumerate() {
            validate(item_schema, v, &format!("{path}[{i}]"), errs);
        }
    }
}

fn validate_object(
    schema: &Value,
    value: &Value,
    map: &Map<String, Value>,
    path: &str,
    display: &str,
    errs: &mut Vec<Cause>,
) {
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errs.push(Cause::new(
                    "FieldValueRequired",
                    join(path, r),
                    "Required value",
                ));
            }
        }
    }
    let count = map.len() as u64;
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
        && count > max
    {
        errs.push(Cause::new(
            "FieldValueTooMany",
            path,
            format!("Too many: {count}: must have at most {max} items"),
        ));
    }
    if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
        && count < min
    {
        errs.push(invalid(
            path,
            value,
            format!("{display} in body should have at least {min} properties"),
        ));
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let embedded = flag(schema, "x-kubernetes-embedded-resource");
    for (k, v) in map {
        if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if embedded && k == "metadata" {
            continue;
        }
        if let Some(sub) = props.and_then(|p| p.get(k)) {
            validate(sub, v, &join(path, k), errs);
        } else if let Some(sub @ Value::Object(_)) = schema.get("additionalProperties") {
            validate(sub, v, &join(path, k), errs);
        }
    }
}

/// `allOf`/`anyOf`/`oneOf`/`not` (value validations only, as structural schemas allow).
fn validate_combinators(
    schema: &Value,
    value: &Value,
    path: &str,
    display: &str,
    errs: &mut Vec<Cause>,
) {
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            validate(s, value, path, errs);
        }
    }
    let passes = |s: &Value| {
        let mut e = Vec::new();
        validate(s, value, path, &mut e);
        e.is_empty()
    };
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
        && !any.is_empty()
        && !any.iter().any(passes)
    {
        errs.push(invalid(
            path,
            value,
            format!("{display} in body must validate at least one schema (anyOf)"),
        ));
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array)
        && !one.is_empty()
        && one.iter().filter(|s| passes(s)).count() != 1
    {
        errs.push(invalid(
            path,
            value,
            format!("{display} in body must validate one and only one schema (oneOf)"),
        ));
    }
    if let Some(not) = schema.get("not")
        && passes(not)
    {
        errs.push(invalid(
            path,
            value,
            format!("{display} in body should not validate the schema (not)"),
        ));
    }
}

/// Checks a CRD version's schema for what the API server would refuse outright: patterns that
/// do not compile. (Everything else is taken as given.)
pub fn check_schema(schema: &Value, path: &str, errs: &mut Vec<Cause>) {
    let Value::Object(map) = schema else { return };
    if let Some(Value::String(p)) = map.get("pattern")
        && pattern(p).is_none()
    {
        errs.push(Cause::new(
            "FieldValueInvalid",
            format!("{path}.pattern"),
            format!("Invalid value: {p:?}: must be a valid regular expression"),
        ));
    }
    for key in ["properties", "patternProperties"] {
        if let Some(Value::Object(props)) = map.get(key) {
            for (k, v) in props {
                check_schema(v, &format!("{path}.{key}[{k}]"), errs);
            }
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(v @ Value::Object(_)) = map.get(key) {
            check_schema(v, &format!("{path}.{key}"), errs);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(list)) = map.get(key) {
            for (i, v) in list.iter().enumerate() {
                check_schema(v, &format!("{path}.{key}[{i}]"), errs);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CEL

/// Looks up `spec.items[0].name` in an object.
fn lookup<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            let idx = idx.trim_end_matches(']');
            cur = match idx.parse::<usize>() {
                Ok(i) => cur.get(i)?,
                Err(_) => cur.get(idx.trim_matches('"'))?,
            };
        }
    }
    Some(cur)
}

/// Evaluates the `x-kubernetes-validations` rules (transition rules with `oldSelf` only when
/// `old` is given) and turns failures into causes shaped like the API server's.
pub fn cel_causes(
    compiled: &kube_cel::CompiledSchema,
    obj: &Value,
    old: Option<&Value>,
) -> Vec<Cause> {
    let Err(errors) = kube_cel::validate_compiled(compiled, obj, old) else {
        return Vec::new();
    };
    errors
        .iter()
        .map(|e| {
            let ty = lookup(obj, &e.field_path)
                .map(type_name)
                .unwrap_or("object");
            let reason = e
                .reason
                .clone()
                .unwrap_or_else(|| "FieldValueInvalid".into());
            let body = match reason.as_str() {
                "FieldValueForbidden" => format!("Forbidden: {}", e.message),
                "FieldValueRequired" => format!("Required value: {}", e.message),
                "FieldValueDuplicate" => format!("Duplicate value: \"{ty}\": {}", e.message),
                // kube-apiserver 1.37 prints no value for CEL failures.
                _ => format!("Invalid value: {}", e.message),
            };
            Cause::new(&reason, e.field_path.clone(), body)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["policy"], "properties": {
                "policy": {"type": "string", "enum": ["a", "b"]},
                "name": {"type": "string", "maxLength": 3, "minLength": 1},
                "tenant": {"type": "string", "pattern": "^[0-9a-f]+$"},
                "size": {"type": "integer", "minimum": 1, "maximum": 5, "default": 2},
                "nested": {"type": "object", "properties": {"x": {"type": "string", "default": "d"}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "port": {"x-kubernetes-int-or-string": true},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}
            }}
        }})
    }

    fn errors(obj: Value) -> Vec<String> {
        let mut errs = Vec::new();
        validate(&schema(), &obj, "", &mut errs);
        errs.iter().map(Cause::line).collect()
    }

    #[test]
    fn messages_match_the_api_server() {
        let e = errors(
            json!({"spec": {"policy": "c", "name": "abcd", "tenant": "xyz", "size": 9, "tags": ["a","b","c"]}}),
        );
        assert!(
            e.contains(
                &"spec.policy: Unsupported value: \"c\": supported values: \"a\", \"b\""
                    .to_string()
            ),
            "{e:?}"
        );
        assert!(
            e.contains(&"spec.name: Too long: may not be more than 3 bytes".to_string()),
            "{e:?}"
        );
        assert!(e.contains(&"spec.tenant: Invalid value: \"xyz\": spec.tenant in body should match '^[0-9a-f]+$'".to_string()), "{e:?}");
        assert!(
            e.contains(
                &"spec.size: Invalid value: 9: spec.size in body should be less than or equal to 5"
                    .to_string()
            ),
            "{e:?}"
        );
        assert!(
            e.contains(&"spec.tags: Too many: 3: must have at most 2 items".to_string()),
            "{e:?}"
        );
        let e = errors(json!({"spec": {"size": "x"}}));
        assert!(
            e.contains(&"spec.policy: Required value".to_string()),
            "{e:?}"
        );
        assert!(e.contains(&"spec.size: Invalid value: \"string\": spec.size in body must be of type integer: \"string\"".to_string()), "{e:?}");
        assert!(errors(json!({"spec": {"policy": "a", "port": 80}})).is_empty());
        assert!(errors(json!({"spec": {"policy": "a", "port": "http"}})).is_empty());
        assert_eq!(
            errors(json!({"spec": {"policy": "a", "port": true}})).len(),
            1
        );
    }

    #[test]
    fn pruning_and_defaults() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n", "junk": 1},
            "spec": {"policy": "a", "bogus": 1, "nested": {}, "free": {"any": {"thing": 1}},
                     "labels": {"k": "v"}, "name": null},
            "extra": true});
        let unknown = prune_root(&schema(), &mut obj);
        assert_eq!(unknown, vec!["extra", "metadata.junk", "spec.bogus"]);
        apply_defaults(&schema(), &mut obj);
        assert_eq!(obj["spec"]["size"], 2);
        assert_eq!(obj["spec"]["nested"]["x"], "d");
        assert!(obj["spec"].get("name").is_none());
        assert_eq!(obj["spec"]["free"]["any"]["thing"], 1);
        assert_eq!(obj["metadata"], json!({"name": "n"}));
    }
}
