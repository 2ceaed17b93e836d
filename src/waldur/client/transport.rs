//! Sending a request: the limiter, the breaker, retries of reads, bounded bodies, and the
//! redaction of the token from every error. The endpoints in `client.rs` build requests;
//! this carries them.

use super::*;

impl WaldurClient {
    pub(super) async fn action(
        &self,
        endpoint: Endpoint,
        uuid: &WaldurUuid,
        action: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, WaldurError> {
        let mut req = self.request(Method::POST, &self.group_url(uuid, Some(action)));
        if let Some(b) = body {
            req = req.json(b);
        }
        let answer = self.send(endpoint, req).await?;
        // The detail text is informative only; an empty or odd body is not an error.
        let detail: Detail = serde_json::from_slice(&answer.body).unwrap_or_default();
        Ok(detail.detail)
    }

    pub(super) fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let mut auth = HeaderValue::from_str(&format!("Token {}", self.token.expose()))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        // Keeps the token out of any debug output of the request.
        auth.set_sensitive(true);
        self.http
            .request(method, url)
            .header(AUTHORIZATION, auth)
            .header(reqwest::header::ACCEPT, "application/json")
    }

    /// A read, tried again on transient failures with jittered exponential backoff. A
    /// `Retry-After` from Waldur stretches the wait when it asks for longer.
    pub(super) async fn read<F>(&self, endpoint: Endpoint, build: F) -> Result<Answer, WaldurError>
    where
        F: Fn() -> RequestBuilder,
    {
        debug_assert!(endpoint.is_read());
        // Every try of this read is one logical request to the breaker (review N4).
        let request = RequestId::new();
        (|| async { self.send_as(endpoint, build(), request).await })
            .retry(self.backoff)
            // An open breaker sent nothing; it says when Waldur answers again.
            .when(|e| e.is_transient() && !e.is_unavailable())
            .adjust(|err, planned| match (err, planned) {
                (
                    WaldurError::Transient {
                        retry_after: Some(asked),
                        ..
                    },
                    Some(planned),
                ) => Some(planned.max(*asked)),
                (_, planned) => planned,
            })
            .notify(|err, wait| {
                tracing::debug!(endpoint = endpoint.as_str(), error = %err, ?wait, "retrying Waldur read");
            })
            .await
    }

    /// Sends one request, a logical request of its own (a write, or a probe).
    pub(super) async fn send(
        &self,
        endpoint: Endpoint,
        req: RequestBuilder,
    ) -> Result<Answer, WaldurError> {
        self.send_as(endpoint, req, RequestId::new()).await
    }

    /// Sends one request and reads the whole answer; anything but 2xx becomes a classified
    /// error. The breaker's permit lives across the await: if this future is dropped (a
    /// reconcile task aborted), the permit's `Drop` frees a probe slot it held (review N1).
    pub(super) async fn send_as(
        &self,
        endpoint: Endpoint,
        req: RequestBuilder,
        request: RequestId,
    ) -> Result<Answer, WaldurError> {
        let permit = match &self.breaker {
            Some(b) => match b.admit(endpoint.as_str()) {
                Ok(p) => Some((b, p)),
                Err(refused) => {
                    if let Some(o) = &self.observer {
                        o.refused(endpoint);
                    }
                    return Err(refused);
                }
            },
            None => None,
        };
        let mut result = self.send_admitted(endpoint, req).await;
        if let Some((b, permit)) = permit {
            let cause = result.as_ref().err().and_then(breaker::unreachable_cause);
            // A failed probe taken by a reconcile's request answers like a held request, so
            // that resource is parked with the others rather than backing off on its own
            // (and, with every probe it happened to take, for longer).
            if permit.is_probe()
                && cause.is_some()
                && let Some(held) = b.refusal(endpoint.as_str())
            {
                result = Err(held);
            }
            match permit.record(request, cause.as_deref()) {
                Transition::Opened => {
                    if let Some(o) = &self.observer {
                        o.breaker_changed(b.waldur(), true);
                    }
                    tokio::spawn(probe_until_closed(self.clone()));
                }
                Transition::Closed => {
                    if let Some(o) = &self.observer {
                        o.breaker_changed(b.waldur(), false);
                    }
                }
                Transition::Unchanged => {}
            }
        }
        result
    }

    /// One cheap read that needs no particular group: what the breaker's probes send.
    pub async fn probe(&self) -> Result<(), WaldurError> {
        let params = ListQuery::new()
            .fields(&["uuid"])
            .page_size(1)
            .params_for_page(1);
        let req = self.request(Method::GET, &self.groups_url()).query(&params);
        self.send(Endpoint::List, req).await.map(|_| ())
    }

    pub(super) async fn send_admitted(
        &self,
        endpoint: Endpoint,
        req: RequestBuilder,
    ) -> Result<Answer, WaldurError> {
        let slot = match &self.limiter {
            Some(l) => Some(
                l.acquire_for(self.capped.then_some(self.base.as_str()))
                    .await,
            ),
            None => None,
        };
        let queued = slot.as_ref().map(|s| s.waited).unwrap_or_default();
        let started = Instant::now();
        let result = self.exchange(endpoint, req).await;
        drop(slot);
        let status = match &result {
            Ok(a) => Some(a.status.as_u16()),
            Err(e) => e.status(),
        };
        if let Some(o) = &self.observer {
            o.observe(endpoint, status, started.elapsed(), queued);
        }
        if let (
            Some(limiter),
            Err(WaldurError::Transient {
                status: Some(429),
                retry_after,
                ..
            }),
        ) = (&self.limiter, &result)
        {
            limiter.pause_for(retry_after.unwrap_or(Duration::from_secs(1)));
        }
        result
    }

    pub(super) async fn exchange(
        &self,
        endpoint: Endpoint,
        req: RequestBuilder,
    ) -> Result<Answer, WaldurError> {
        let name = endpoint.as_str();
        let response = req
            .send()
            .await
            .map_err(|e| WaldurError::from_transport(name, &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        // A page of 300 groups is well under a MiB; an error body is read only to quote it.
        let cap = if status.is_success() {
            MAX_BODY
        } else {
            MAX_ERROR_BODY
        };
        let body = read_capped(response, cap, name, status.is_success()).await?;
        if status.is_success() {
            return Ok(Answer {
                status,
                headers,
                body,
            });
        }
        let retry_after = retry_after(&headers);
        let err = WaldurError::from_response(name, status.as_u16(), &body, retry_after);
        Err(self.redact(err))
    }

    /// A server that echoes the token back in an error body must not make it show in logs,
    /// status or Events: every variant that quotes Waldur's words is covered (review m11).
    pub(super) fn redact(&self, err: WaldurError) -> WaldurError {
        let token = self.token.expose();
        let clean = |text: String| {
            if text.contains(token) {
                text.replace(token, "***")
            } else {
                text
            }
        };
        match err {
            WaldurError::Transient {
                endpoint,
                reason,
                retry_after,
                status,
            } => WaldurError::Transient {
                endpoint,
                reason: clean(reason),
                retry_after,
                status,
            },
            WaldurError::Unauthorized { endpoint, detail } => WaldurError::Unauthorized {
                endpoint,
                detail: clean(detail),
            },
            WaldurError::Forbidden { endpoint, detail } => WaldurError::Forbidden {
                endpoint,
                detail: clean(detail),
            },
            WaldurError::NotFound { endpoint, detail } => WaldurError::NotFound {
                endpoint,
                detail: clean(detail),
            },
            WaldurError::Conflict { endpoint, detail } => WaldurError::Conflict {
                endpoint,
                detail: clean(detail),
            },
            WaldurError::Invalid { endpoint, messages } => WaldurError::Invalid {
                endpoint,
                messages: FieldMessages(
                    messages
                        .0
                        .into_iter()
                        .map(|m| FieldMessage {
                            field: m.field.map(clean),
                            message: clean(m.message),
                        })
                        .collect(),
                ),
            },
            WaldurError::NoSuchRoute { endpoint, excerpt } => WaldurError::NoSuchRoute {
                endpoint,
                excerpt: clean(excerpt),
            },
            WaldurError::Unexpected {
                endpoint,
                status,
                excerpt,
            } => WaldurError::Unexpected {
                endpoint,
                status,
                excerpt: clean(excerpt),
            },
            WaldurError::Config(message) => WaldurError::Config(clean(message)),
            WaldurError::Unavailable {
                endpoint,
                waldur,
                since,
                cause,
            } => WaldurError::Unavailable {
                endpoint,
                waldur,
                since,
                cause: clean(cause),
            },
        }
    }
}

/// The page number in the `rel="next"` entry of a `Link` header.
pub(super) fn next_page(headers: &HeaderMap) -> Option<u32> {
    headers
        .get_all(reqwest::header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find(|entry| entry.contains("rel=\"next\"") || entry.contains("rel=next"))
        .and_then(|entry| {
            let target = entry.split(';').next()?.trim();
            let target = target.trim_start_matches('<').trim_end_matches('>');
            let url = url::Url::parse(target).ok()?;
            url.query_pairs()
                .find(|(k, _)| k == "page")
                .and_then(|(_, v)| v.parse().ok())
        })
}

pub(super) fn result_count(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("x-result-count")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Retry-After` in seconds; the HTTP-date form is rare from Waldur and is ignored.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

/// Reads the body chunk by chunk and stops at `cap`: a success body past it is an error (the
/// caller must not act on half a page); an error body is simply cut (it is only quoted).
pub(super) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
    endpoint: &'static str,
    must_be_whole: bool,
) -> Result<bytes::Bytes, WaldurError> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| WaldurError::from_transport(endpoint, &e))?
    {
        let room = cap.saturating_sub(body.len());
        if chunk.len() > room {
            if must_be_whole {
                return Err(WaldurError::Unexpected {
                    endpoint,
                    status: response.status().as_u16(),
                    excerpt: format!("the answer is larger than {} MiB", cap >> 20),
                });
            }
            body.extend_from_slice(&chunk[..room]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// (Boxed with its type spelled out: the probe's own request may open the breaker again,
/// and an `async fn` calling itself through `send` has a type the compiler cannot name.)
pub(super) fn probe_until_closed(
    client: WaldurClient,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let Some(breaker) = client.breaker.clone() else {
            return;
        };
        loop {
            // Registered before the state is read, so a probe ending meanwhile still wakes us.
            let ended = breaker.probe_ended();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let Some(wait) = breaker.until_probe() else {
                return;
            };
            if wait.is_zero() {
                // Refused when a reconcile's request took this second's probe: fine, it
                // probes, and the next turn waits for it.
                let _ = client.probe().await;
                continue;
            }
            // While another probe is in flight this waits for its end (or at most a
            // second), never asks again at once: no busy loop (review N1, E4b).
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut ended => {}
            }
        }
    })
}
