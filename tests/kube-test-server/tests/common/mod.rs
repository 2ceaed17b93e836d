//! Shared test fixtures: the Widget CRD and a kube client for a test server.
#![allow(dead_code)]

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube_test_server::TestServer;
use serde_json::{Value, json};

/// A small CRD with the features the tests exercise: status subresource, an enum, a required
/// field, maxLength, a pattern, a default, a bounded integer, a CEL rule and a CEL transition
/// rule (oldSelf), printer columns, a short name and a category.
pub const WIDGET_CRD_YAML: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd], categories: [gadgets]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: string, jsonPath: .spec.size}
    - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        required: [spec]
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: string, enum: [small, medium, large]}
              name: {type: string, maxLength: 10}
              tenant: {type: string, pattern: '^[0-9a-f]+$'}
              color: {type: string, default: blue}
              replicas: {type: integer, minimum: 0, maximum: 5}
              tags: {type: array, items: {type: string}}
            x-kubernetes-validations:
            - rule: "!has(self.name) || self.name != 'forbidden'"
              message: "spec.name must not be 'forbidden'"
            - rule: "!has(oldSelf.tenant) || (has(self.tenant) && self.tenant == oldSelf.tenant)"
              message: spec.tenant is immutable
          status:
            type: object
            properties:
              phase: {type: string}
              observedGeneration: {type: integer}
              conditions:
                type: array
                items:
                  type: object
                  required: [type, status]
                  properties:
                    type: {type: string}
                    status: {type: string}
                    observedGeneration: {type: integer}
                    reason: {type: string}
                    message: {type: string}
                    lastTransitionTime: {type: string, format: date-time}
"#;

pub fn widget_crd() -> Value {
    serde_yaml_ng::from_str(WIDGET_CRD_YAML).expect("CRD YAML")
}

/// A server with the Widget CRD installed.
pub async fn server() -> TestServer {
    let server = TestServer::start().await.expect("start test server");
    server.install_crd(widget_crd()).expect("install CRD");
    server
}

/// A kube client built from the server's kubeconfig, as an operator would build one.
pub async fn client(server: &TestServer, namespace: &str) -> kube::Client {
    let kubeconfig =
        Kubeconfig::from_yaml(&server.kubeconfig_yaml(namespace)).expect("parse kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    let client = kube::Client::try_from(config).expect("kube client");
    ensure_namespace(&client, namespace).await;
    client
}

/// Creates a namespace unless it exists (objects need one, as on a real server).
pub async fn ensure_namespace(client: &kube::Client, namespace: &str) {
    if namespace == "default" {
        return;
    }
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(client.clone());
    let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))
        .expect("a Namespace");
    match namespaces.create(&Default::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {namespace}: {e}"),
    }
}

pub fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    )
}

pub fn widgets(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &widget_resource())
}

pub fn all_widgets(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &widget_resource())
}

/// A Widget object.
pub fn widget(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("widget")
}

/// The Status of a failed call.
pub fn api_error(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}
