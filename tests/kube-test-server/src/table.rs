//! Server-side printing (`Accept: ...;as=Table;g=meta.k8s.io;v=v1`), which `kubectl get` asks
//! for, with CRD `additionalPrinterColumns` evaluated by a small JSONPath subset.

use serde_json::{Value, json};

use crate::resources::{Flavor, Resource};
use crate::util::{age_seconds, human_duration, meta_str};

/// How much of each object a Table row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// `PartialObjectMetadata` of an object.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

#[derive(Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    Filter(String, Value),
}

fn parse_path(path: &str) -> Option<Vec<Step>> {
    let p = path.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(p);
    let mut steps = Vec::new();
    let mut rest = p;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end > 0 {
                steps.push(Step::Field(r[..end].to_string()));
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = r[..end].trim();
            if inner == "*" {
                steps.push(Step::All);
            } else if let Ok(i) = inner.parse::<usize>() {
                steps.push(Step::Index(i));
            } else if let Some(f) = inner.strip_prefix("?(").and_then(|x| x.strip_suffix(')')) {
                let (lhs, rhs) = f.split_once("==")?;
                let key = lhs.trim().strip_prefix("@.")?.to_string();
                let rhs = rhs.trim();
                let val = if let Some(s) = rhs
                    .strip_prefix('"')
                    .and_then(|x| x.strip_suffix('"'))
                    .or_else(|| rhs.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                {
                    Value::String(s.to_string())
                } else {
                    serde_json::from_str(rhs).unwrap_or(Value::String(rhs.to_string()))
                };
                steps.push(Step::Filter(key, val));
            } else {
                let key = inner.trim_matches(|c| c == '\'' || c == '"');
                steps.push(Step::Field(key.to_string()));
            }
            rest = &r[end + 1..];
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            steps.push(Step::Field(rest[..end].to_string()));
            rest = &rest[end..];
        }
    }
    Some(steps)
}

/// Evaluates a JSONPath (`.a.b`, `[0]`, `[*]`, `[?(@.type=="Ready")]`) against an object.
pub fn jsonpath(obj: &Value, path: &str) -> Vec<Value> {
    let Some(steps) = parse_path(path) else {
        return Vec::new();
    };
    let mut cur = vec![obj.clone()];
    for step in steps {
        let mut next = Vec::new();
        for v in cur {
            match &step {
                Step::Field(f) => {
                    if let Some(x) = v.get(f) {
                        next.push(x.clone());
                    }
                }
                Step::Index(i) => {
                    if let Some(x) = v.get(*i) {
                        next.push(x.clone());
                    }
                }
                Step::All => match v {
                    Value::Array(a) => next.extend(a),
                    Value::Object(m) => next.extend(m.into_iter().map(|(_, x)| x)),
                    _ => {}
                },
                Step::Filter(key, want) => {
                    if let Value::Array(a) = v {
                        next.extend(a.into_iter().filter(|x| x.get(key) == Some(want)));
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

fn column(name: &str, ty: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

fn age_cell(ts: &str) -> Value {
    match age_seconds(ts) {
        Some(s) => Value::String(human_duration(s)),
        None => Value::String("<unknown>".into()),
    }
}

fn columns(res: &Resource, version: &str) -> Vec<Value> {
    let name_col = column(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
        0,
    );
    let age_col = column(
        "Age",
        "date",
        "",
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
        0,
    );
    match res.flavor {
        Flavor::Custom => {
            let printer = res
                .version(version)
                .map(|v| v.printer_columns.clone())
                .unwrap_or_default();
            if printer.is_empty() {
                return vec![name_col, age_col];
            }
            let mut cols = vec![name_col];
            for c in printer {
                let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                cols.push(column(
                    &s("name"),
                    &s("type"),
                    &s("format"),
                    &s("description"),
                    c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                ));
            }
            cols
        }
        Flavor::Secret => vec![
            name_col,
            column("Type", "string", "", "", 0),
            column("Data", "string", "", "", 0),
            age_col,
        ],
        Flavor::Namespace => vec![name_col, column("Status", "string", "", "", 0), age_col],
        Flavor::Lease => vec![name_col, column("Holder", "string", "", "", 0), age_col],
        Flavor::CoreEvent | Flavor::Event => vec![
            name_col,
            column("Type", "string", "", "", 0),
            column("Reason", "string", "", "", 0),
            age_col,
        ],
        Flavor::Crd => vec![name_col, column("Created At", "date", "", "", 0)],
        Flavor::ConfigMap => vec![name_col, column("Data", "string", "", "", 0), age_col],
    }
}

fn first_str(obj: &Value, path: &str) -> Value {
    jsonpath(obj, path)
        .into_iter()
        .next()
        .map(|v| match v {
            Value::String(s) => Value::String(s),
            other => Value::String(other.to_string()),
        })
        .unwrap_or(Value::String(String::new()))
}

fn cells(res: &Resource, version: &str, obj: &Value) -> Vec<Value> {
    let name = Value::String(meta_str(obj, "name").to_string());
    let created = meta_str(obj, "creationTimestamp");
    match res.flavor {
        Flavor::Custom => {
            let printer = res
                .version(version)
                .map(|v| v.printer_columns.clone())
                .unwrap_or_default();
            if printer.is_empty() {
                return vec![name, age_cell(created)];
            }
            let mut out = vec![name];
            for c in printer {
                let path = c.get("jsonPath").and_then(Value::as_str).unwrap_or("");
                let ty = c.get("type").and_then(Value::as_str).unwrap_or("string");
                let found = jsonpath(obj, path);
                let cell = match found.as_slice() {
                    [] => Value::Null,
                    [one] => match (ty, one) {
                        ("date", Value::String(s)) => age_cell(s),
                        ("string", Value::String(_)) => one.clone(),
                        ("string", other) => Value::String(other.to_string()),
                        _ => one.clone(),
                    },
                    many => Value::String(
                        many.iter()
                            .map(|v| match v {
                                Value::String(s) => s.clone(),
                                o => o.to_string(),
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                };
                out.push(cell);
            }
            out
        }
        Flavor::Secret => vec![
            name,
            first_str(obj, ".type"),
            Value::from(
                obj.get("data")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len()),
            ),
            age_cell(created),
        ],
        Flavor::ConfigMap => vec![
            name,
            Value::from(
                obj.get("data")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len()),
            ),
            age_cell(created),
        ],
        Flavor::Namespace => vec![name, first_str(obj, ".status.phase"), age_cell(created)],
        Flavor::Lease => vec![
            name,
            first_str(obj, ".spec.holderIdentity"),
            age_cell(created),
        ],
        Flavor::CoreEvent | Flavor::Event => vec![
            name,
            first_str(obj, ".type"),
            first_str(obj, ".reason"),
            age_cell(created),
        ],
        Flavor::Crd => vec![name, Value::String(created.to_string())],
    }
}

fn row(res: &Resource, version: &str, obj: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells(res, version, obj)});
    let object = match include {
        Include::None => None,
        Include::Metadata => Some(partial_metadata(obj)),
        Include::Object => Some(obj.clone()),
    };
    if let (Some(o), Some(m)) = (object, r.as_object_mut()) {
        m.insert("object".into(), o);
    }
    r
}

/// A `Table` of objects; `list_meta` is the list's metadata (resourceVersion, continue).
pub fn table(
    res: &Resource,
    version: &str,
    items: &[Value],
    list_meta: Value,
    include: Include,
    table_version: &str,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{table_version}"),
        "metadata": list_meta,
        "columnDefinitions": columns(res, version),
        "rows": items.iter().map(|o| row(res, version, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let obj = json!({"status": {"conditions": [
            {"type": "Synced", "status": "False"}, {"type": "Ready", "status": "True"}]},
            "spec": {"items": [{"n": 1}, {"n": 2}]}});
        assert_eq!(
            jsonpath(&obj, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![json!("True")]
        );
        assert_eq!(jsonpath(&obj, ".spec.items[1].n"), vec![json!(2)]);
        assert_eq!(jsonpath(&obj, ".spec.items[*].n"), vec![json!(1), json!(2)]);
        assert_eq!(jsonpath(&obj, "{.spec.missing}"), Vec::<Value>::new());
    }
}
