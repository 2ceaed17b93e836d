//! Discovery documents (legacy and aggregated) and the OpenAPI endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::resources::{Resource, VERBS, version_priority};
use crate::store::Store;

/// The versions of a group (sorted by Kubernetes version priority) with the resources served
/// at each.
type GroupVersions = Vec<(String, Vec<Arc<Resource>>)>;

/// group -> its versions.
fn groups(store: &Store) -> BTreeMap<String, GroupVersions> {
    let mut map: BTreeMap<String, BTreeMap<String, Vec<Arc<Resource>>>> = BTreeMap::new();
    for r in store.resources() {
        for v in &r.versions {
            map.entry(r.group.clone())
                .or_default()
                .entry(v.name.clone())
                .or_default()
                .push(r.clone());
        }
    }
    map.into_iter()
        .map(|(g, versions)| {
            let mut vs: Vec<(String, Vec<Arc<Resource>>)> = versions.into_iter().collect();
            vs.sort_by_key(|(v, _)| version_priority(v));
            (g, vs)
        })
        .collect()
}

/// The resources of one group/version, if any.
pub fn resources_at(store: &Store, group: &str, version: &str) -> Option<Vec<Arc<Resource>>> {
    groups(store)
        .remove(group)?
        .into_iter()
        .find(|(v, _)| v == version)
        .map(|(_, r)| r)
}

fn resource_entries(r: &Resource, version: &str) -> Vec<Value> {
    let mut main = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
    });
    if let Some(m) = main.as_object_mut() {
        if !r.short_names.is_empty() {
            m.insert("shortNames".into(), json!(r.short_names));
        }
        if !r.categories.is_empty() {
            m.insert("categories".into(), json!(r.categories));
        }
    }
    let mut out = vec![main];
    if r.has_status(version) {
        out.push(json!({
            "name": format!("{}/status", r.plural),
            "singularName": "",
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["get", "patch", "update"],
        }));
    }
    out
}

/// `APIResourceList` for `/api/v1` or `/apis/{group}/{version}`.
pub fn resource_list(store: &Store, group: &str, version: &str) -> Option<Value> {
    let resources = resources_at(store, group, version)?;
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let list: Vec<Value> = resources
        .iter()
        .flat_map(|r| resource_entries(r, version))
        .collect();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": list,
    }))
}

/// `APIVersions` for `/api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn api_group(name: &str, versions: &GroupVersions) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|(v, _)| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    let preferred = vs.first().cloned().unwrap_or(json!({}));
    json!({"name": name, "versions": vs, "preferredVersion": preferred})
}

/// `APIGroupList` for `/apis`.
pub fn group_list(store: &Store) -> Value {
    let groups: Vec<Value> = groups(store)
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| api_group(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `APIGroup` for `/apis/{group}`.
pub fn group(store: &Store, name: &str) -> Option<Value> {
    let all = groups(store);
    let vs = all.get(name).filter(|_| !name.is_empty())?;
    let mut g = api_group(name, vs);
    if let Some(m) = g.as_object_mut() {
        m.insert("kind".into(), json!("APIGroup"));
        m.insert("apiVersion".into(), json!("v1"));
    }
    Some(g)
}

/// The aggregated discovery document (`APIGroupDiscoveryList`) for `/api` (`core`) or `/apis`.
pub fn aggregated(store: &Store, core: bool, disco_version: &str) -> Value {
    let items: Vec<Value> = groups(store)
        .iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|(v, resources)| {
                    let rs: Vec<Value> = resources
                        .iter()
                        .map(|r| {
                            let kind = json!({"group": r.group, "version": v, "kind": r.kind});
                            let mut e = json!({
                                "resource": r.plural,
                                "responseKind": kind,
                                "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": r.singular,
                                "verbs": VERBS,
                            });
                            if let Some(m) = e.as_object_mut() {
                                if !r.short_names.is_empty() {
                                    m.insert("shortNames".into(), json!(r.short_names));
                                }
                                if !r.categories.is_empty() {
                                    m.insert("categories".into(), json!(r.categories));
                                }
                                if r.has_status(v) {
                                    m.insert(
                                        "subresources".into(),
                                        json!([{"subresource": "status", "responseKind": kind,
                                                "verbs": ["get", "patch", "update"]}]),
                                    );
                                }
                            }
                            e
                        })
                        .collect();
                    json!({"version": v, "resources": rs, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{disco_version}"),
        "metadata": {},
        "items": items,
    })
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: one entry per group/version.
pub fn openapi_v3_root(store: &Store) -> Value {
    let mut paths = serde_json::Map::new();
    for (g, vs) in groups(store) {
        for (v, _) in vs {
            let p = gv_path(&g, &v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", store.resource_version())}),
            );
        }
    }
    json!({"paths": paths})
}

fn gvk_ext(r: &Resource, v: &str) -> Value {
    json!([{"group": r.group, "version": v, "kind": r.kind}])
}

/// `/openapi/v3/apis/{group}/{version}`: the resources' schemas (custom resources: the CRD's
/// schema, with `apiVersion`/`kind`/`metadata` added) and their operations, with the
/// `fieldValidation` parameter so kubectl leaves validation to the server.
pub fn openapi_v3_gv(store: &Store, group: &str, version: &str) -> Option<Value> {
    let resources = resources_at(store, group, version)?;
    let mut schemas = serde_json::Map::new();
    let mut paths = serde_json::Map::new();
    let field_validation = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let dry_run =
        json!({"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let field_manager = json!({"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    for r in &resources {
        let schema_name = format!(
            "{}.{}.{}",
            if r.group.is_empty() {
                "io.k8s.api.core"
            } else {
                &r.group
            },
            version,
            r.kind
        );
        let mut schema = r
            .version(version)
            .and_then(|v| v.schema.clone())
            .unwrap_or_else(
                || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
        if let Some(m) = schema.as_object_mut() {
            let props = m
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            if let Some(p) = props {
                p.insert("apiVersion".into(), json!({"type": "string"}));
                p.insert("kind".into(), json!({"type": "string"}));
                p.insert(
                    "metadata".into(),
                    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
                );
            }
            m.insert(
                "x-kubernetes-group-version-kind".into(),
                gvk_ext(r, version),
            );
        }
        schemas.insert(schema_name.clone(), schema);
        let body_ref = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema_name}")}}}});
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema_name}")}}}}});
        let op = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "parameters": [field_validation, dry_run, field_manager],
                "requestBody": body_ref,
                "responses": ok,
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk_ext(r, version)[0],
            })
        };
        let base = if r.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}",
                gv_path(group, version),
                r.plural
            )
        } else {
            format!("/{}/{}", gv_path(group, version), r.plural)
        };
        paths.insert(base.clone(), json!({"post": op("post")}));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"put": op("put"), "patch": op("patch")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.37.2"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// `/version`.
pub fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "gitVersion": "v1.37.2",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.5",
        "compiler": "gc",
        "platform": "linux/amd64",
        "emulationMajor": "1",
        "emulationMinor": "37",
    })
}
