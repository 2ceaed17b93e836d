//! API errors, rendered as the `Status` objects a real API server answers with.

use serde_json::{Value, json};

/// One field-level cause of an `Invalid` (422) answer, as `metav1.StatusCause`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueInvalid`, ...
    pub reason: String,
    /// The error body without the field prefix, e.g. `Required value`.
    pub message: String,
    /// The field path, e.g. `spec.policy`.
    pub field: String,
}

impl Cause {
    pub fn new(reason: &str, field: impl Into<String>, message: impl Into<String>) -> Cause {
        Cause {
            reason: reason.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// `spec.policy: Required value`, as `field.Error.Error()` prints it.
    pub fn line(&self) -> String {
        if self.field.is_empty() {
            // kube prints an empty field path as `<nil>`.
            format!("<nil>: {}", self.message)
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// An error answer of the API, turned into a `Status` body by [`ApiError::to_status`].
#[derive(Clone, Debug, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
    /// The Status's ListMeta `continue`: a 410 on an expired continue token carries a token
    /// that goes on at the newest revision.
    pub continue_token: Option<String>,
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
            continue_token: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// The answer for an unknown path, group, resource or subresource.
    pub fn no_route() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn method_not_allowed(method: &str, what: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource: {method} {what}"
            ),
        )
        .with_details(json!({}))
    }

    /// A PATCH content type the resource does not take, as the patch handler words it.
    pub fn unsupported_patch_type(supported: &[&str]) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                supported.join(", ")
            ),
        )
    }

    pub fn unsupported_media_type(content_type: &str, supported: &[&str]) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}; got {content_type:?}",
                supported.join(", ")
            ),
        )
    }

    /// `widgets.example.com "x" not found`
    pub fn not_found(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(plural, group)),
        )
        .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    /// `widgets.example.com "x" already exists`
    pub fn already_exists(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(plural, group)),
        )
        .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    /// The optimistic-concurrency conflict (stale `resourceVersion`).
    pub fn conflict(group: &str, plural: &str, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(plural, group)
            ),
        )
        .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    pub fn stale(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::conflict(
            group,
            plural,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// `Widget.example.com "x" is invalid: [a, b]` with one cause per field error.
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> ApiError {
        // As Go's aggregate error, the message lists each distinct error once.
        let mut lines: Vec<String> = Vec::new();
        for l in causes.iter().map(Cause::line) {
            if !lines.contains(&l) {
                lines.push(l);
            }
        }
        let summary = if lines.len() == 1 {
            lines[0].clone()
        } else {
            format!("[{}]", lines.join(", "))
        };
        let gk = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let causes: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        ApiError::new(
            422,
            "Invalid",
            format!("{gk} \"{name}\" is invalid: {summary}"),
        )
        .with_details(json!({"name": name, "group": group, "kind": kind, "causes": causes}))
    }

    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    /// An error injected by `fail_next`, shaped like what the real server says for that code.
    pub fn injected(code: u16, group: &str, plural: &str, name: &str) -> ApiError {
        let what = if name.is_empty() {
            qualified(plural, group)
        } else {
            format!("{} \"{name}\"", qualified(plural, group))
        };
        match code {
            409 => ApiError::stale(group, plural, name),
            404 => ApiError::not_found(group, plural, name),
            410 => ApiError::expired(format!("too old resource version (injected) for {what}")),
            400 => ApiError::bad_request(format!("injected bad request for {what}")),
            401 => ApiError::new(401, "Unauthorized", "Unauthorized"),
            403 => ApiError::new(
                403,
                "Forbidden",
                format!("{what} is forbidden: injected by the test server"),
            ),
            422 => ApiError::new(422, "Invalid", format!("{what} is invalid: injected")),
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            500 => ApiError::internal(format!(
                "Internal error occurred: injected failure for {what}"
            )),
            503 => ApiError::new(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => ApiError::new(
                504,
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still be processing the request",
            ),
            other => ApiError::new(
                other,
                "Unknown",
                format!("injected failure {other} for {what}"),
            ),
        }
    }

    /// The `Status` body.
    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if self.reason.is_empty()
            && let Some(obj) = v.as_object_mut()
        {
            // Go's omitempty: an error without a reason (a plain 500) has none.
            obj.remove("reason");
        }
        if let (Some(d), Some(obj)) = (&self.details, v.as_object_mut()) {
            obj.insert("details".into(), d.clone());
        }
        if let Some(token) = &self.continue_token {
            v["metadata"] = json!({"continue": token});
        }
        v
    }
}

/// `widgets.example.com`, or `secrets` for the core group.
pub fn qualified(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// How kube's `field.Invalid` prints a value: strings quoted, numbers and booleans bare.
pub fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "\"null\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
        Value::Object(_) => "\"object\"".to_string(),
    }
}

/// The JSON type name of a value, as the schema validator and CEL messages call it.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
