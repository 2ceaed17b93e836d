//! `metadata.managedFields` and server-side apply.
//!
//! Field ownership is tracked per manager at the level of leaf fields of maps: every scalar,
//! list and empty map is one owned field (`.spec.policy`, `.metadata.labels.app`). Lists are
//! atomic (owned and replaced as a whole: no merging by `x-kubernetes-list-map-keys`), except
//! `metadata.finalizers`, a set whose items are owned one by one.
//! The tracked part of `metadata` is `labels`, `annotations`, `finalizers` and
//! `ownerReferences`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

pub type FieldPath = Vec<String>;

/// Which part of an object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The main resource; `status_is_subresource` hides `.status`.
    Main { status_is_subresource: bool },
    /// The `/status` subresource: `.status` only.
    Status,
}

impl Scope {
    pub fn subresource(self) -> Option<&'static str> {
        match self {
            Scope::Main { .. } => None,
            Scope::Status => Some("status"),
        }
    }

    fn includes_top(self, key: &str) -> bool {
        match (self, key) {
            (_, "apiVersion" | "kind") => false,
            (Scope::Status, k) => k == "status",
            (
                Scope::Main {
                    status_is_subresource: true,
                },
                "status",
            ) => false,
            _ => true,
        }
    }
}

const TRACKED_META: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

/// `metadata.finalizers` is a `listType=set`: each item is owned on its own, as the path
/// element `v:"<item>"` (the key `fieldsV1` uses).
fn set_item(item: &Value) -> String {
    format!("v:{item}")
}

fn is_finalizers(path: &[String]) -> bool {
    path.len() == 2 && path[0] == "metadata" && path[1] == "finalizers"
}

/// The owned leaves of an object within a scope, with their values.
pub fn leaves(obj: &Value, scope: Scope) -> BTreeMap<FieldPath, Value> {
    let mut out = BTreeMap::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        if !scope.includes_top(k) {
            continue;
        }
        if k == "metadata" {
            if let Some(meta) = v.as_object() {
                for mk in TRACKED_META {
                    if let Some(mv) = meta.get(*mk) {
                        let path = vec!["metadata".to_string(), (*mk).to_string()];
                        match mv.as_array() {
                            Some(items) if *mk == "finalizers" => {
                                for item in items {
                                    let mut p = path.clone();
                                    p.push(set_item(item));
                                    out.insert(p, item.clone());
                                }
                            }
                            _ => walk(mv, path, &mut out),
                        }
                    }
                }
            }
            continue;
        }
        walk(v, vec![k.clone()], &mut out);
    }
    out
}

fn walk(v: &Value, path: FieldPath, out: &mut BTreeMap<FieldPath, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, sub) in m {
                let mut p = path.clone();
                p.push(k.clone());
                walk(sub, p, out);
            }
        }
        other => {
            out.insert(path, other.clone());
        }
    }
}

pub fn get_path<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |cur, k| match cur {
        Value::Array(items) if k.starts_with("v:") => items.iter().find(|i| set_item(i) == *k),
        _ => cur.get(k),
    })
}

fn exists(obj: &Value, path: &[String]) -> bool {
    get_path(obj, path).is_some()
}

/// Removes a field and then any maps left empty by it (never a top-level field).
fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = &mut *obj;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(items) = cur.as_array_mut()
        && last.starts_with("v:")
    {
        items.retain(|i| set_item(i) != *last);
        if items.is_empty() {
            remove_path(obj, parents);
        }
        return;
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
        if m.is_empty() && parents.len() > 1 {
            remove_path(obj, parents);
        }
    }
}

/// `.spec.policy`
pub fn show_path(path: &[String]) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: BTreeSet<FieldPath>,
}

impl Entry {
    fn same_slot(&self, manager: &str, operation: &str, sub: Option<&str>) -> bool {
        self.manager == manager && self.operation == operation && self.subresource.as_deref() == sub
    }
}

fn parse_fields(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Some(m) = v.as_object() else { return };
    let children: Vec<(&String, &Value)> = m.iter().filter(|(k, _)| k.starts_with("f:")).collect();
    let keyed = m
        .keys()
        .any(|k| k.starts_with("k:") || k.starts_with("v:") || k.starts_with("i:"));
    if keyed && is_finalizers(path) {
        for k in m.keys().filter(|k| k.starts_with("v:")) {
            let mut p = path.clone();
            p.push(k.clone());
            out.insert(p);
        }
        return;
    }
    if (children.is_empty() || keyed) && !path.is_empty() {
        out.insert(path.clone());
        return;
    }
    for (k, sub) in children {
        path.push(k[2..].to_string());
        parse_fields(sub, path, out);
        path.pop();
    }
}

fn render_fields(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut cur = &mut root;
        for k in path {
            let key = if k.starts_with("v:") {
                k.clone()
            } else {
                format!("f:{k}")
            };
            let next = cur.entry(key).or_insert_with(|| Value::Object(Map::new()));
            if !next.is_object() {
                *next = Value::Object(Map::new());
            }
            match next.as_object_mut() {
                Some(m) => cur = m,
                None => break,
            }
        }
    }
    Value::Object(root)
}

/// Reads `metadata.managedFields`.
pub fn parse_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let manager = e.get("manager")?.as_str()?.to_string();
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                parse_fields(f, &mut Vec::new(), &mut fields);
            }
            Some(Entry {
                manager,
                operation: e
                    .get("operation")
                    .and_then(Value::as_str)
                    .unwrap_or("Update")
                    .to_string(),
                api_version: e
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                time: e
                    .get("time")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                subresource: e
                    .get("subresource")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                fields,
            })
        })
        .collect()
}

/// Writes `metadata.managedFields` (removed when there are no entries).
pub fn store_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": render_fields(&e.fields),
            });
            if let (Some(s), Some(m)) = (&e.subresource, v.as_object_mut()) {
                m.insert("subresource".into(), Value::String(s.clone()));
            }
            v
        })
        .collect();
    if let Some(meta) = crate::util::meta_mut(obj) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// What the field manager of a request is, for a non-apply write.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub scope: Scope,
    pub now: &'a str,
}

/// Records a non-apply write (create, update, patch) as operation `Update` of `w.manager`:
/// it gains the fields it changed, and every other manager loses them.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Writer<'_>) {
    let mut entries = old.map(parse_entries).unwrap_or_default();
    let before = old.map(|o| leaves(o, w.scope)).unwrap_or_default();
    let after = leaves(new, w.scope);
    let mut changed: BTreeSet<FieldPath> = BTreeSet::new();
    for (p, v) in &after {
        if before.get(p) != Some(v) {
            changed.insert(p.clone());
        }
    }
    let removed: BTreeSet<FieldPath> = before
        .keys()
        .filter(|p| !after.contains_key(*p))
        .cloned()
        .collect();
    let sub = w.scope.subresource();
    for e in entries.iter_mut() {
        e.fields.retain(|p| !removed.contains(p));
        if !e.same_slot(w.manager, "Update", sub) {
            e.fields.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.same_slot(w.manager, "Update", sub))
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = w.now.to_string();
                e.api_version = w.api_version.to_string();
            }
            None => entries.push(Entry {
                manager: w.manager.to_string(),
                operation: "Update".into(),
                api_version: w.api_version.to_string(),
                time: w.now.to_string(),
                subresource: sub.map(str::to_string),
                fields: changed,
            }),
        }
    }
    for e in entries.iter_mut() {
        e.fields.retain(|p| exists(new, p));
    }
    store_entries(new, &entries);
}

/// A field another manager owns with a different value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager as kube-apiserver prints it (`printManager`): `"m"` for an Apply
    /// entry, `"m" using <apiVersion>` for an Update one, with ` with subresource "status"`.
    pub manager: String,
    pub path: FieldPath,
}

/// The message and causes of a 409 for apply conflicts.
pub fn conflict_message(conflicts: &[Conflict]) -> (String, Vec<Value>) {
    let n = conflicts.len();
    let mut by_manager: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for c in conflicts {
        by_manager
            .entry(&c.manager)
            .or_default()
            .push(show_path(&c.path));
    }
    let msg = if n == 1 {
        let c = &conflicts[0];
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            c.manager,
            show_path(&c.path)
        )
    } else {
        let parts: Vec<String> = by_manager
            .iter()
            .map(|(m, paths)| {
                let lines: Vec<String> = paths.iter().map(|p| format!("- {p}")).collect();
                format!("conflicts with {m}:\n{}", lines.join("\n"))
            })
            .collect();
        format!("Apply failed with {n} conflicts: {}", parts.join("\n"))
    };
    let causes = conflicts
        .iter()
        .map(|c| {
            json!({"reason": "FieldManagerConflict",
                   "message": format!("conflict with {}", c.manager),
                   "field": show_path(&c.path)})
        })
        .collect();
    (msg, causes)
}

/// What an apply request is.
pub struct Apply<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub scope: Scope,
    pub force: bool,
    pub now: &'a str,
}

fn merge_into(target: &mut Value, src: &Value) {
    match (target, src) {
        (Value::Object(t), Value::Object(s)) => {
            for (k, v) in s {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_into(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, s) => *t = s.clone(),
    }
}

/// Server-side apply of `applied` onto `current`: conflicts with other managers are refused
/// unless forced (then ownership moves), fields this manager applied before but omits now are
/// removed unless another manager owns them, and the applied fields are merged in (maps
/// recursively, lists and scalars replaced).
pub fn apply(current: &Value, applied: &Value, a: &Apply<'_>) -> Result<Value, Vec<Conflict>> {
    let mut entries = parse_entries(current);
    let sub = a.scope.subresource();
    let mine = |e: &Entry| e.same_slot(a.manager, "Apply", sub);
    let wanted = leaves(applied, a.scope);

    let mut conflicts = Vec::new();
    for (p, v) in &wanted {
        if get_path(current, p) == Some(v) {
            continue;
        }
        for e in entries.iter().filter(|e| !mine(e)) {
            if e.fields.contains(p) {
                let mut manager = format!("{:?}", e.manager);
                if let Some(sub) = &e.subresource {
                    manager.push_str(&format!(" with subresource {sub:?}"));
                }
                if e.operation == "Update" {
                    manager.push_str(&format!(" using {}", e.api_version));
                }
                conflicts.push(Conflict {
                    manager,
                    path: p.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() && !a.force {
        return Err(conflicts);
    }
    for c in &conflicts {
        for e in entries.iter_mut().filter(|e| !mine(e)) {
            e.fields.remove(&c.path);
        }
    }

    let previous: BTreeSet<FieldPath> = entries
        .iter()
        .find(|e| mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut merged = current.clone();
    for p in previous.iter().filter(|p| !wanted.contains_key(*p)) {
        let owned_elsewhere = entries
            .iter()
            .filter(|e| !mine(e))
            .any(|e| e.fields.contains(p));
        if !owned_elsewhere {
            remove_path(&mut merged, p);
        }
    }

    // Merge the scoped part of the applied configuration.
    if let (Some(m), Some(src)) = (merged.as_object_mut(), applied.as_object()) {
        for (k, v) in src {
            if !a.scope.includes_top(k) {
                continue;
            }
            if k == "metadata" {
                let meta = m
                    .entry("metadata")
                    .or_insert_with(|| Value::Object(Map::new()));
                for mk in TRACKED_META {
                    if let Some(mv) = v.get(*mk) {
                        match meta.get_mut(*mk) {
                            Some(existing) if existing.is_object() && mv.is_object() => {
                                merge_into(existing, mv)
                            }
                            // A set: the applied items join the others' items.
                            Some(Value::Array(existing)) if *mk == "finalizers" => {
                                for item in mv.as_array().into_iter().flatten() {
                                    if !existing.contains(item) {
                                        existing.push(item.clone());
                                    }
                                }
                            }
                            _ => {
                                if let Some(mm) = meta.as_object_mut() {
                                    mm.insert((*mk).to_string(), mv.clone());
                                }
                            }
                        }
                    }
                }
                continue;
            }
            match m.get_mut(k) {
                Some(existing) if existing.is_object() && v.is_object() => merge_into(existing, v),
                _ => {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
    }

    let fields: BTreeSet<FieldPath> = wanted.keys().cloned().collect();
    match entries.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            e.fields = fields;
            e.time = a.now.to_string();
            e.api_version = a.api_version.to_string();
        }
        None => entries.push(Entry {
            manager: a.manager.to_string(),
            operation: "Apply".into(),
            api_version: a.api_version.to_string(),
            time: a.now.to_string(),
            subresource: sub.map(str::to_string),
            fields,
        }),
    }
    for e in entries.iter_mut() {
        e.fields.retain(|p| exists(&merged, p));
    }
    store_entries(&mut merged, &entries);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: Scope = Scope::Main {
        status_is_subresource: true,
    };

    fn apply_as(cur: &Value, cfg: Value, mgr: &str, force: bool) -> Result<Value, Vec<Conflict>> {
        apply(
            cur,
            &cfg,
            &Apply {
                manager: mgr,
                api_version: "example.com/v1",
                scope: MAIN,
                force,
                now: "2026-01-01T00:00:00Z",
            },
        )
    }

    #[test]
    fn apply_merges_removes_and_detects_conflicts() {
        let cur = json!({"apiVersion": "example.com/v1", "kind": "W", "metadata": {"name": "x"},
                         "spec": {"a": 1, "b": {"c": 2}}, "status": {"s": 1}});
        let v = apply_as(
            &cur,
            json!({"spec": {"a": 1, "d": [1, 2]}, "metadata": {"labels": {"l": "1"}}}),
            "m1",
            false,
        )
        .unwrap_or_else(|c| panic!("{c:?}"));
        assert_eq!(v["spec"], json!({"a": 1, "b": {"c": 2}, "d": [1, 2]}));
        assert_eq!(v["metadata"]["labels"]["l"], "1");
        let e = parse_entries(&v);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].fields
                .contains(&vec!["spec".to_string(), "d".to_string()])
        );
        assert_eq!(
            v["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:d"],
            json!({})
        );
        // m1 drops spec.d: removed. m2 sets spec.a differently: conflict unless forced.
        let v2 = apply_as(&v, json!({"spec": {"a": 1}}), "m1", false)
            .unwrap_or_else(|c| panic!("{c:?}"));
        assert!(v2["spec"].get("d").is_none());
        assert!(v2["metadata"].get("labels").is_none());
        let err = apply_as(&v2, json!({"spec": {"a": 5}}), "m2", false)
            .err()
            .unwrap_or_default();
        assert_eq!(err.len(), 1);
        assert_eq!(
            conflict_message(&err).0,
            // m1's entry is an Apply: kube-apiserver names no apiVersion for it.
            "Apply failed with 1 conflict: conflict with \"m1\": .spec.a"
        );
        let v3 = apply_as(&v2, json!({"spec": {"a": 5}}), "m2", true)
            .unwrap_or_else(|c| panic!("{c:?}"));
        assert_eq!(v3["spec"]["a"], 5);
        // m1 no longer owns spec.a, so omitting it does not remove m2's value.
        let v4 =
            apply_as(&v3, json!({"spec": {}}), "m1", false).unwrap_or_else(|c| panic!("{c:?}"));
        assert_eq!(v4["spec"]["a"], 5);
    }

    #[test]
    fn updates_take_ownership() {
        let old = json!({"metadata": {"name": "x"}, "spec": {"a": 1}});
        let mut new = json!({"metadata": {"name": "x"}, "spec": {"a": 2, "b": 1}});
        let w = Writer {
            manager: "kubectl",
            api_version: "example.com/v1",
            scope: MAIN,
            now: "t",
        };
        record_update(Some(&old), &mut new, &w);
        let e = parse_entries(&new);
        assert_eq!(e[0].manager, "kubectl");
        assert_eq!(e[0].operation, "Update");
        assert_eq!(e[0].fields.len(), 2);
    }
}
