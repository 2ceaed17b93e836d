//! Error answers, shaped the way Django REST framework and Waldur shape them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Django's production 500 page: what real servers send for the collection POST.
pub const DJANGO_500_HTML: &str = "<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Server Error (500)</title>\n</head>\n<body>\n  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n";

/// Django's production 404 page: what a URL no pattern matches gets (no JSON, no `detail`).
pub const DJANGO_404_HTML: &str = "<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n</body>\n</html>\n";

/// Every non-2xx answer of the simulated API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("401 {0}")]
    Unauthorized(&'static str),
    #[error("403 permission denied")]
    Forbidden,
    /// No such object (or not visible): Waldur's JSON `{"detail": "Not found."}`.
    #[error("404 not found")]
    NotFound,
    /// No URL pattern matches: Django's HTML 404 page.
    #[error("404 no such route")]
    NoRoute,
    #[error("404 invalid page")]
    InvalidPage,
    #[error("405 method {0} not allowed")]
    MethodNotAllowed(String),
    #[error("409 {0}")]
    Conflict(String),
    /// 400 with a field map, `non_field_errors`, or a bare list.
    #[error("400 {0}")]
    Invalid(Value),
    #[error("400 JSON parse error - {0}")]
    Parse(String),
    /// Unhandled exception in Django: HTML body.
    #[error("500 server error")]
    ServerError,
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An HTML error page with the given status, like Django or a proxy in front of it would send.
pub fn html_error(status: StatusCode) -> Response {
    let body = if status == StatusCode::INTERNAL_SERVER_ERROR {
        DJANGO_500_HTML.to_string()
    } else if status == StatusCode::NOT_FOUND {
        DJANGO_404_HTML.to_string()
    } else {
        // nginx's stock error page, which is what clients see for 502/503/504 in practice.
        let line = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        );
        format!(
            "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        )
    };
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Unauthorized(detail) => {
                let mut resp =
                    json_response(StatusCode::UNAUTHORIZED, &json!({ "detail": detail }));
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Token"));
                resp
            }
            ApiError::Forbidden => json_response(
                StatusCode::FORBIDDEN,
                &json!({"detail": "You do not have permission to perform this action."}),
            ),
            ApiError::NotFound => {
                json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not found."}))
            }
            ApiError::NoRoute => html_error(StatusCode::NOT_FOUND),
            ApiError::InvalidPage => {
                json_response(StatusCode::NOT_FOUND, &json!({"detail": "Invalid page."}))
            }
            ApiError::MethodNotAllowed(method) => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "detail": format!("Method \"{method}\" not allowed.") }),
            ),
            ApiError::Conflict(detail) => {
                json_response(StatusCode::CONFLICT, &json!({ "detail": detail }))
            }
            ApiError::Invalid(body) => json_response(StatusCode::BAD_REQUEST, &body),
            ApiError::Parse(msg) => json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "detail": format!("JSON parse error - {msg}") }),
            ),
            ApiError::ServerError => html_error(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}
