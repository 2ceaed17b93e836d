//! Waldur failures, classified by what the caller should do about them.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// How long an unexpected body may be when it is quoted in an error.
const EXCERPT_CHARS: usize = 300;

/// The class of a failure; the controller maps each to a condition reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Timeouts, resets, 5xx, 429: try again later.
    Transient,
    /// 401: the token is missing, wrong or expired.
    Unauthorized,
    /// 403: the token may not do this (for example unlink without staff).
    Forbidden,
    /// 404: missing, or not visible to this token.
    NotFound,
    /// 409: the object or tenant is in a state that does not allow this now.
    Conflict,
    /// 400: Waldur rejected the request; retrying the same request cannot help.
    Invalid,
    /// A 404 that is not Waldur's JSON: this server has no such route (for example `set_ok`
    /// before Waldur 8.0), or the address is not a Waldur API.
    Unsupported,
    /// Anything else: a status or body Waldur's contract does not describe.
    Unexpected,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Invalid => "invalid",
            Self::Unsupported => "unsupported",
            Self::Unexpected => "unexpected",
        }
    }
}

/// One message of a 400 answer, with the field it is about when Waldur named one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMessage {
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for FieldMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Waldur's 400 messages, shown joined with `; `.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldMessages(pub Vec<FieldMessage>);

impl fmt::Display for FieldMessages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(no message)");
        }
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

/// A failed call to Waldur. The messages are Waldur's own, so users see what Waldur said.
/// No variant ever holds the API token.
#[derive(Clone, Debug, thiserror::Error)]
pub enum WaldurError {
    #[error("Waldur is unavailable ({endpoint}): {reason}")]
    Transient {
        endpoint: &'static str,
        reason: String,
        /// From a `Retry-After` header, when Waldur sent one.
        retry_after: Option<Duration>,
        /// The HTTP status, when an answer came at all.
        status: Option<u16>,
    },
    #[error("Waldur rejected the credentials ({endpoint}): {detail}")]
    Unauthorized {
        endpoint: &'static str,
        detail: String,
    },
    #[error("Waldur forbids this for the token in use ({endpoint}): {detail}")]
    Forbidden {
        endpoint: &'static str,
        detail: String,
    },
    #[error("not found in Waldur ({endpoint}): {detail}")]
    NotFound {
        endpoint: &'static str,
        detail: String,
    },
    #[error("Waldur refused in the current state ({endpoint}): {detail}")]
    Conflict {
        endpoint: &'static str,
        detail: String,
    },
    #[error("Waldur rejected the request ({endpoint}): {messages}")]
    Invalid {
        endpoint: &'static str,
        messages: FieldMessages,
    },
    #[error(
        "this Waldur has no such route ({endpoint}): HTTP 404 without Waldur's JSON: {excerpt}"
    )]
    NoSuchRoute {
        endpoint: &'static str,
        excerpt: String,
    },
    #[error("unexpected answer from Waldur ({endpoint}): HTTP {status}: {excerpt}")]
    Unexpected {
        endpoint: &'static str,
        status: u16,
        excerpt: String,
    },
    /// A problem in the client's own settings (URL, CA bundle), found before any request.
    #[error("invalid Waldur client settings: {0}")]
    Config(String),
    /// Not sent: the breaker of this Waldur is open (see `breaker`). The words stay the same
    /// for the whole outage.
    #[error(
        "Waldur at {waldur} is unreachable since {} ({cause}); the operator probes it once a second and retries as soon as it answers",
        format_since(*since)
    )]
    Unavailable {
        endpoint: &'static str,
        waldur: String,
        since: std::time::SystemTime,
        cause: String,
    },
}

fn format_since(since: std::time::SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(since)
        .ok()
        .and_then(|t| t.round(k8s_openapi::jiff::Unit::Second).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| "a moment ago".into())
}

impl WaldurError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Transient { .. } | Self::Unavailable { .. } => ErrorKind::Transient,
            Self::Unauthorized { .. } => ErrorKind::Unauthorized,
            Self::Forbidden { .. } => ErrorKind::Forbidden,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Conflict { .. } => ErrorKind::Conflict,
            Self::Invalid { .. } => ErrorKind::Invalid,
            Self::NoSuchRoute { .. } => ErrorKind::Unsupported,
            Self::Unexpected { .. } | Self::Config(_) => ErrorKind::Unexpected,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// Refused by an open breaker: nothing was sent, and retrying before it closes is useless.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// The HTTP status Waldur answered with, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Transient { status, .. } => *status,
            Self::Unauthorized { .. } => Some(401),
            Self::Forbidden { .. } => Some(403),
            Self::NotFound { .. } => Some(404),
            Self::Conflict { .. } => Some(409),
            Self::Invalid { .. } => Some(400),
            Self::NoSuchRoute { .. } => Some(404),
            Self::Unexpected { status, .. } => Some(*status),
            Self::Config(_) | Self::Unavailable { .. } => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// Waldur's own words, without the operator's framing: what goes into a condition message.
    pub fn waldur_message(&self) -> String {
        match self {
            Self::Transient { reason, .. } => reason.clone(),
            Self::Unauthorized { detail, .. }
            | Self::Forbidden { detail, .. }
            | Self::NotFound { detail, .. }
            | Self::Conflict { detail, .. } => detail.clone(),
            Self::Invalid { messages, .. } => messages.to_string(),
            Self::NoSuchRoute { excerpt, .. } => format!("HTTP 404: {excerpt}"),
            Self::Unexpected {
                status, excerpt, ..
            } => format!("HTTP {status}: {excerpt}"),
            Self::Config(msg) => msg.clone(),
            Self::Unavailable { .. } => self.to_string(),
        }
    }

    /// Classifies a non-success answer. `body` may be anything: JSON of any shape, HTML, empty.
    pub(crate) fn from_response(
        endpoint: &'static str,
        status: u16,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> Self {
        let json: Option<Value> = serde_json::from_slice(body).ok();
        let detail = || {
            json.as_ref()
                .and_then(|v| v.get("detail"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| excerpt(body))
        };
        match status {
            400 => Self::Invalid {
                endpoint,
                messages: json
                    .as_ref()
                    .map(field_messages)
                    .filter(|m| !m.0.is_empty())
                    .unwrap_or_else(|| {
                        FieldMessages(vec![FieldMessage {
                            field: None,
                            message: excerpt(body),
                        }])
                    }),
            },
            401 => Self::Unauthorized {
                endpoint,
                detail: detail(),
            },
            403 => Self::Forbidden {
                endpoint,
                detail: detail(),
            },
            // Waldur says "not found" in JSON; an HTML 404 is Django's page for a route this
            // server lacks (or not Waldur at all), never "the object is gone".
            404 if json.is_none() => Self::NoSuchRoute {
                endpoint,
                excerpt: excerpt(body),
            },
            404 => Self::NotFound {
                endpoint,
                detail: detail(),
            },
            409 => Self::Conflict {
                endpoint,
                detail: detail(),
            },
            429 | 500..=599 => Self::Transient {
                endpoint,
                reason: format!("HTTP {status}: {}", excerpt(body)),
                retry_after,
                status: Some(status),
            },
            _ => Self::Unexpected {
                endpoint,
                status,
                excerpt: excerpt(body),
            },
        }
    }

    /// Classifies a failure to get any answer: connection refused or reset, timeouts, a body
    /// cut short. None of these say the request was refused, so all are transient.
    pub(crate) fn from_transport(endpoint: &'static str, err: &reqwest::Error) -> Self {
        let what = if err.is_timeout() {
            "timed out"
        } else if err.is_connect() {
            "could not connect"
        } else if err.is_body() || err.is_decode() {
            "the answer was cut short"
        } else {
            "the connection failed"
        };
        // reqwest's Display names the URL, never headers, so the token cannot leak here.
        Self::Transient {
            endpoint,
            reason: format!("{what}: {}", error_chain(err)),
            retry_after: None,
            status: None,
        }
    }

    /// A 2xx answer whose body is not what the contract describes.
    pub(crate) fn malformed(endpoint: &'static str, status: u16, why: &str, body: &[u8]) -> Self {
        Self::Unexpected {
            endpoint,
            status,
            excerpt: format!("{why}; body: {}", excerpt(body)),
        }
    }
}

/// Flattens DRF's 400 shapes: `{field: [msgs]}`, `{"non_field_errors": [...]}`, `["msg"]`,
/// `{"detail": "..."}` and nested serializer errors.
fn field_messages(v: &Value) -> FieldMessages {
    let mut out = Vec::new();
    collect_messages(None, v, &mut out);
    FieldMessages(out)
}

fn collect_messages(field: Option<String>, v: &Value, out: &mut Vec<FieldMessage>) {
    match v {
        Value::String(s) => out.push(FieldMessage {
            field,
            message: s.clone(),
        }),
        Value::Array(items) => items
            .iter()
            .for_each(|i| collect_messages(field.clone(), i, out)),
        Value::Object(map) => {
            for (k, inner) in map {
                let name = match (k.as_str(), &field) {
                    ("non_field_errors" | "detail", None) => None,
                    ("non_field_errors" | "detail", Some(f)) => Some(f.clone()),
                    (k, None) => Some(k.to_string()),
                    (k, Some(f)) => Some(format!("{f}.{k}")),
                };
                collect_messages(name, inner, out);
            }
        }
        Value::Null => {}
        other => out.push(FieldMessage {
            field,
            message: other.to_string(),
        }),
    }
}

/// A bounded, single-line excerpt of a body that may be HTML, binary or huge.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".to_string();
    }
    let mut cut: String = one_line.chars().take(EXCERPT_CHARS).collect();
    if one_line.chars().count() > EXCERPT_CHARS {
        cut.push('…');
    }
    cut
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> WaldurError {
        WaldurError::from_response("test", status, body.as_bytes(), None)
    }

    #[test]
    fn statuses_map_to_their_classes() {
        let cases = [
            (400, ErrorKind::Invalid),
            (401, ErrorKind::Unauthorized),
            (403, ErrorKind::Forbidden),
            (404, ErrorKind::NotFound),
            (409, ErrorKind::Conflict),
            (429, ErrorKind::Transient),
            (500, ErrorKind::Transient),
            (502, ErrorKind::Transient),
            (503, ErrorKind::Transient),
            (504, ErrorKind::Transient),
            (405, ErrorKind::Unexpected),
            (418, ErrorKind::Unexpected),
            (302, ErrorKind::Unexpected),
        ];
        for (status, kind) in cases {
            assert_eq!(classify(status, "{}").kind(), kind, "HTTP {status}");
        }
    }

    #[test]
    fn every_drf_400_shape_keeps_waldur_words() {
        let e = classify(
            400,
            r#"{"policy": ["\"anti-affinity\" is not a valid choice."]}"#,
        );
        assert_eq!(
            e.waldur_message(),
            "policy: \"anti-affinity\" is not a valid choice."
        );
        let e = classify(
            400,
            r#"{"non_field_errors":["Server group name should be unique."]}"#,
        );
        assert_eq!(e.waldur_message(), "Server group name should be unique.");
        let e = classify(400, r#"["Resource does not have backend ID."]"#);
        assert_eq!(e.waldur_message(), "Resource does not have backend ID.");
        let e = classify(
            400,
            r#"{"name":["This field may not be blank."],"description":["Too long."]}"#,
        );
        assert_eq!(
            e.waldur_message(),
            "description: Too long.; name: This field may not be blank."
        );
        // The fourth shape, for a body that is not JSON at all.
        let e = classify(
            400,
            r#"{"detail": "JSON parse error - Expecting value: line 1 column 1 (char 0)"}"#,
        );
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(
            e.waldur_message(),
            "JSON parse error - Expecting value: line 1 column 1 (char 0)"
        );
    }

    #[test]
    fn a_404_is_not_found_only_in_waldurs_json() {
        let gone = classify(404, r#"{"detail": "Not found."}"#);
        assert!(gone.is_not_found());
        // Django's page for a route this server lacks (set_ok before 8.0): not "gone".
        let html = classify(
            404,
            "<!doctype html><title>Not Found</title><h1>Not Found</h1>",
        );
        assert_eq!(html.kind(), ErrorKind::Unsupported);
        assert!(!html.is_not_found());
        assert!(html.to_string().contains("no such route"), "{html}");
    }

    #[test]
    fn non_json_bodies_are_quoted_bounded_never_panic() {
        let html = format!("<html><body>{}</body></html>", "x".repeat(5000));
        let e = classify(502, &html);
        assert!(e.is_transient());
        assert!(e.to_string().len() < 450, "{}", e.to_string().len());
        let e = WaldurError::from_response("test", 400, &[0xff, 0xfe, 0x00], None);
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let e = classify(409, "");
        assert!(e.to_string().contains("(empty body)"));
        // multi-byte characters at the cut must not split a char
        let e = classify(418, &"é".repeat(1000));
        assert!(e.to_string().ends_with('…'));
    }

    #[test]
    fn detail_is_shown_for_status_only_errors() {
        let e = classify(
            409,
            r#"{"detail":"Valid states for operation: OK, ERRED."}"#,
        );
        assert_eq!(
            e.to_string(),
            "Waldur refused in the current state (test): Valid states for operation: OK, ERRED."
        );
    }
}
