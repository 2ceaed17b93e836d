//! One typed async method per server-group endpoint of Waldur's REST API.
//!
//! Every request goes through [`WaldurClient::send`], the single place that adds the token,
//! measures, and classifies the answer. Reads (GET, HEAD) retry transient failures with
//! jittered backoff; writes never retry, because a write that timed out may have been done.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

use super::breaker::{self, Breaker, RequestId, Transition};
use super::error::{FieldMessage, FieldMessages, WaldurError};
use super::limiter::Limiter;
use super::model::{Detail, NewServerGroup, ServerGroup, Tenant, WaldurUuid};
use super::query::ListQuery;

mod transport;

use transport::{next_page, result_count};

/// Waldur clamps larger pages to this size.
pub const MAX_PAGE_SIZE: u32 = 300;
/// A guard against a server whose `Link` header never ends.
const MAX_PAGES: u32 = 10_000;

/// An API token. It is shown as `***` wherever it is formatted.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into().trim().to_string())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// How to reach one Waldur.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Waldur's address, for example `https://waldur.example.com` (a trailing `/api/` is fine).
    pub url: String,
    pub token: Token,
    /// The whole request, body included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) trusted besides the system's.
    pub ca_bundle_pem: Option<Vec<u8>>,
    /// Skip TLS verification. Dangerous; the operator logs a warning when it is on.
    pub insecure_skip_tls_verify: bool,
    /// How many times a read is tried again after a transient failure.
    pub read_retries: usize,
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
}

impl ClientSettings {
    pub fn new(url: impl Into<String>, token: Token) -> Self {
        Self {
            url: url.into(),
            token,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ca_bundle_pem: None,
            insecure_skip_tls_verify: false,
            read_retries: 3,
            retry_min_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(5),
        }
    }
}

/// The Waldur endpoints, named for metrics, logs and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    List,
    Count,
    Retrieve,
    Create,
    CreateOnCollection,
    Pull,
    Delete,
    Unlink,
    SetErred,
    SetOk,
    /// The tenant's re-sync of its server groups (`pull_server_groups`).
    PullTenant,
    /// One tenant (`GET /api/openstack-tenants/{uuid}/`): its state.
    TenantRetrieve,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Count => "count",
            Self::Retrieve => "retrieve",
            Self::Create => "create",
            Self::CreateOnCollection => "create_collection",
            Self::Pull => "pull",
            Self::Delete => "delete",
            Self::Unlink => "unlink",
            Self::SetErred => "set_erred",
            Self::SetOk => "set_ok",
            Self::PullTenant => "pull_server_groups",
            Self::TenantRetrieve => "tenant_retrieve",
        }
    }

    /// Only reads are safe to send twice.
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Self::List | Self::Count | Self::Retrieve | Self::TenantRetrieve
        )
    }
}

/// Told about every request, for metrics. `status` is `None` when no answer came.
pub trait Observer: Send + Sync {
    fn observe(&self, endpoint: Endpoint, status: Option<u16>, elapsed: Duration, queued: Duration);
    /// A request not sent because the breaker of its Waldur is open.
    fn refused(&self, _endpoint: Endpoint) {}
    /// The breaker of the Waldur at `waldur` opened (`open`) or closed.
    fn breaker_changed(&self, _waldur: &str, _open: bool) {}
    /// The Waldur at `waldur` has not been used for long: its per-Waldur state is dropped.
    fn breaker_forgotten(&self, _waldur: &str) {}
}

/// What came back from a successful request.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// A client for one Waldur and one token. Cheap to clone.
#[derive(Clone)]
pub struct WaldurClient {
    http: reqwest::Client,
    /// `https://host[/prefix]`, without a trailing slash.
    base: String,
    token: Token,
    backoff: ExponentialBuilder,
    limiter: Option<Arc<Limiter>>,
    /// Whether this client's requests count against the limiter's per-Waldur cap (review
    /// N5). Every Waldur is capped but the operator's default one, which the admin chose.
    capped: bool,
    observer: Option<Arc<dyn Observer>>,
    breaker: Option<Arc<Breaker>>,
}

impl fmt::Debug for WaldurClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaldurClient")
            .field("base", &self.base)
            .field("token", &self.token)
            .finish()
    }
}

impl WaldurClient {
    pub fn new(settings: &ClientSettings) -> Result<Self, WaldurError> {
        let base = normalise_base(&settings.url)?;
        if settings.token.is_empty() {
            return Err(WaldurError::Config("the Waldur token is empty".into()));
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("waldur-operator/", env!("CARGO_PKG_VERSION")))
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .tls_danger_accept_invalid_certs(settings.insecure_skip_tls_verify);
        if let Some(pem) = &settings.ca_bundle_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| WaldurError::Config(format!("the CA bundle is not valid PEM: {e}")))?;
            if certs.is_empty() {
                return Err(WaldurError::Config(
                    "the CA bundle holds no certificate".into(),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| WaldurError::Config(format!("cannot build the HTTP client: {e}")))?;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(settings.retry_min_delay)
            .with_max_delay(settings.retry_max_delay)
            .with_max_times(settings.read_retries)
            .with_jitter();
        Ok(Self {
            http,
            base,
            token: settings.token.clone(),
            backoff,
            limiter: None,
            capped: true,
            observer: None,
            breaker: None,
        })
    }

    /// Sends every request through `limiter` (shared with other clients), within the
    /// limiter's cap for this client's Waldur.
    pub fn with_limiter(mut self, limiter: Arc<Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Exempts this client from the per-Waldur cap: for the operator's default Waldur, whose
    /// address the admin chose, so it keeps the whole in-flight budget.
    pub fn without_waldur_cap(mut self) -> Self {
        self.capped = false;
        self
    }

    /// Reports every request to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Sends every request through `breaker`, the one view of this Waldur's health that
    /// every client of the same Waldur shares.
    pub fn with_breaker(mut self, breaker: Arc<Breaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    pub fn breaker(&self) -> Option<&Arc<Breaker>> {
        self.breaker.as_ref()
    }

    /// The base address requests go to, as normalised.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn groups_url(&self) -> String {
        format!("{}/api/openstack-server-groups/", self.base)
    }

    fn group_url(&self, uuid: &WaldurUuid, action: Option<&str>) -> String {
        // A UUID Waldur sent is taken as it came (review m9): encoded, an odd one can only name
        // a group that is not there, never another path or a query.
        let uuid = path_segment(uuid.as_str());
        match action {
            Some(a) => format!("{}/api/openstack-server-groups/{uuid}/{a}/", self.base),
            None => format!("{}/api/openstack-server-groups/{uuid}/", self.base),
        }
    }

    /// Every visible server group matching `query`, all pages, each group once.
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<ServerGroup>, WaldurError> {
        let mut out: Vec<ServerGroup> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        self.list_pages(query, |items| {
            // A walk may read a group twice (see `list_pages`): once is what was asked for.
            out.extend(items.into_iter().filter(|g| seen.insert(g.uuid.clone())));
        })
        .await?;
        Ok(out)
    }

    /// Like [`list`](Self::list), handing over each page as it arrives: a sweep of 10,000
    /// groups then never holds them all in one more buffer beside its index. A group may come
    /// twice.
    ///
    /// Offset paging skips a row when rows before it go between two pages (a mass deletion),
    /// so the pages after the first are read from the last back to the second, and the first
    /// once more at the end: a row that slides back lands on a page still to be read, never
    /// on one already read, and rows made meanwhile come after every row read (the order is
    /// by `created`). A page gone past the end meanwhile (404 `Invalid page.`) is skipped:
    /// its rows slid onto earlier pages. Returns whether the walk is exact (every group that
    /// was there throughout was read): always, but for a Waldur that sends no
    /// `X-Result-Count`, whose pages are read forward as before and which is exact on one page
    /// only. `Link: rel="next"` and the count say how many pages there are; only page numbers
    /// are used, so a Waldur behind a proxy that writes its own host into links is still read
    /// through the configured address.
    pub async fn list_pages(
        &self,
        query: &ListQuery,
        mut on_page: impl FnMut(Vec<ServerGroup>),
    ) -> Result<bool, WaldurError> {
        let first = self.list_page(query, 1).await?;
        let more = next_page(&first.headers);
        let count = result_count(&first.headers);
        on_page(decode(Endpoint::List, &first)?);
        let Some(next) = more.filter(|n| *n > 1 && *n <= MAX_PAGES) else {
            return Ok(true);
        };
        let Some(count) = count else {
            let mut page = next;
            loop {
                let answer = self.list_page(query, page).await?;
                on_page(decode(Endpoint::List, &answer)?);
                match next_page(&answer.headers) {
                    Some(n) if n > page && n <= MAX_PAGES => page = n,
                    _ => return Ok(false),
                }
            }
        };
        let size = u64::from(query.size());
        let last = u32::try_from(count.div_ceil(size))
            .unwrap_or(MAX_PAGES)
            .clamp(next, MAX_PAGES);
        for page in (next..=last).rev() {
            match self.list_page(query, page).await {
                Ok(answer) => on_page(decode(Endpoint::List, &answer)?),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let again = self.list_page(query, 1).await?;
        on_page(decode(Endpoint::List, &again)?);
        Ok(true)
    }

    async fn list_page(&self, query: &ListQuery, page: u32) -> Result<Answer, WaldurError> {
        let params = query.params_for_page(page);
        self.read(Endpoint::List, || {
            self.request(Method::GET, &self.groups_url()).query(&params)
        })
        .await
    }

    /// How many server groups match `query`, from `X-Result-Count` of a HEAD request.
    pub async fn count(&self, query: &ListQuery) -> Result<u64, WaldurError> {
        let params = query.filter_params();
        let answer = self
            .read(Endpoint::Count, || {
                self.request(Method::HEAD, &self.groups_url())
                    .query(&params)
            })
            .await?;
        result_count(&answer.headers).ok_or_else(|| {
            WaldurError::malformed(
                Endpoint::Count.as_str(),
                answer.status.as_u16(),
                "no X-Result-Count header",
                &[],
            )
        })
    }

    /// One server group. `fields` asks for a sparse answer; empty means all fields.
    pub async fn get(
        &self,
        uuid: &WaldurUuid,
        fields: &[&str],
    ) -> Result<ServerGroup, WaldurError> {
        let params: Vec<(&str, &str)> = fields.iter().map(|f| ("field", *f)).collect();
        let answer = self
            .read(Endpoint::Retrieve, || {
                self.request(Method::GET, &self.group_url(uuid, None))
                    .query(&params)
            })
            .await?;
        decode(Endpoint::Retrieve, &answer)
    }

    /// Creates a server group through the tenant action, the route real Waldur serves.
    pub async fn create(
        &self,
        tenant: &WaldurUuid,
        new: &NewServerGroup,
    ) -> Result<ServerGroup, WaldurError> {
        let url = format!(
            "{}/api/openstack-tenants/{tenant}/create_server_group/",
            self.base
        );
        let answer = self
            .send(Endpoint::Create, self.request(Method::POST, &url).json(new))
            .await?;
        decode(Endpoint::Create, &answer)
    }

    /// Asks Waldur to re-sync the tenant's server groups from OpenStack now (202; the rows
    /// change a few seconds later): rows whose Nova group is gone are deleted, Nova groups
    /// without a row are imported under new UUIDs, ERRED rows whose group exists go back to OK.
    pub async fn pull_tenant_server_groups(&self, tenant: &WaldurUuid) -> Result<(), WaldurError> {
        let url = format!(
            "{}/api/openstack-tenants/{tenant}/pull_server_groups/",
            self.base
        );
        self.send(Endpoint::PullTenant, self.request(Method::POST, &url))
            .await
            .map(|_| ())
    }

    /// One tenant, for its state: whether Waldur holds it (a tenant action running), whether
    /// it is Erred, and so whether a re-sync asked for has finished.
    pub async fn get_tenant(&self, tenant: &WaldurUuid) -> Result<Tenant, WaldurError> {
        let url = format!("{}/api/openstack-tenants/{tenant}/", self.base);
        let params = [
            ("field", "uuid"),
            ("field", "name"),
            ("field", "state"),
            ("field", "error_message"),
        ];
        let answer = self
            .read(Endpoint::TenantRetrieve, || {
                self.request(Method::GET, &url).query(&params)
            })
            .await?;
        decode(Endpoint::TenantRetrieve, &answer)
    }

    /// Creates on the collection, as the public docs describe. Real servers answer 500 here;
    /// it exists for API completeness and is not what the operator uses.
    pub async fn create_on_collection(
        &self,
        tenant_url: &str,
        new: &NewServerGroup,
    ) -> Result<ServerGroup, WaldurError> {
        let mut body = serde_json::to_value(new)
            .map_err(|e| WaldurError::Config(format!("cannot encode the create request: {e}")))?;
        if let Some(map) = body.as_object_mut() {
            map.insert("tenant".into(), tenant_url.into());
        }
        let req = self.request(Method::POST, &self.groups_url()).json(&body);
        let answer = self.send(Endpoint::CreateOnCollection, req).await?;
        decode(Endpoint::CreateOnCollection, &answer)
    }

    /// Asks Waldur to re-read the group from OpenStack (202). Returns Waldur's message.
    pub async fn pull(&self, uuid: &WaldurUuid) -> Result<String, WaldurError> {
        self.action(Endpoint::Pull, uuid, "pull", None).await
    }

    /// Schedules deletion (202). The group is gone once a GET answers 404.
    pub async fn delete(&self, uuid: &WaldurUuid) -> Result<(), WaldurError> {
        let req = self.request(Method::DELETE, &self.group_url(uuid, None));
        self.send(Endpoint::Delete, req).await.map(|_| ())
    }

    /// Removes Waldur's record only, leaving OpenStack untouched (staff only, 204).
    pub async fn unlink(&self, uuid: &WaldurUuid) -> Result<(), WaldurError> {
        let req = self.request(Method::POST, &self.group_url(uuid, Some("unlink")));
        self.send(Endpoint::Unlink, req).await.map(|_| ())
    }

    /// Marks the group ERRED (staff only), for groups stuck in a transitional state.
    pub async fn set_erred(
        &self,
        uuid: &WaldurUuid,
        error_message: Option<&str>,
        error_traceback: Option<&str>,
    ) -> Result<String, WaldurError> {
        let mut body = serde_json::Map::new();
        if let Some(m) = error_message {
            body.insert("error_message".into(), m.into());
        }
        if let Some(t) = error_traceback {
            body.insert("error_traceback".into(), t.into());
        }
        let body = serde_json::Value::Object(body);
        self.action(Endpoint::SetErred, uuid, "set_erred", Some(&body))
            .await
    }

    /// Marks the group OK and clears its error fields (staff only).
    pub async fn set_ok(&self, uuid: &WaldurUuid) -> Result<String, WaldurError> {
        self.action(Endpoint::SetOk, uuid, "set_ok", None).await
    }
}

fn decode<T: DeserializeOwned>(endpoint: Endpoint, answer: &Answer) -> Result<T, WaldurError> {
    serde_json::from_slice(&answer.body).map_err(|e| {
        WaldurError::malformed(
            endpoint.as_str(),
            answer.status.as_u16(),
            &format!("the body is not the expected JSON ({e})"),
            &answer.body,
        )
    })
}

/// Accepts `https://host`, `https://host/`, `https://host/api/` and `https://host/prefix/api`.
///
/// Refuses a user name or password (`https://u:p@host/`), a query string and a fragment
/// (review m10, N10): the base URL is shown in logs, status, Events and the
/// `waldur_unreachable{waldur=...}` label, so it must hold nothing secret, and a query would
/// be lost or mangled when paths are appended. The refusal never quotes the URL when it may
/// hold user info.
pub fn normalise_base(raw: &str) -> Result<String, WaldurError> {
    let raw = raw.trim();
    // A URL with an `@` may carry a password: never echo it.
    let shown = if raw.contains('@') {
        "(not shown: it holds user info)".to_string()
    } else {
        format!("{raw:?}")
    };
    let parsed = url::Url::parse(raw)
        .map_err(|e| WaldurError::Config(format!("the Waldur URL {shown} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(WaldurError::Config(format!(
            "the Waldur URL {shown} must be an http(s) address with a host"
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(WaldurError::Config(
            "the Waldur URL must not hold a user name or password (user:password@): the token \
             goes under the key \"token\", never into the URL"
                .into(),
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(WaldurError::Config(format!(
            "the Waldur URL {} must not have a query string (?...) or a fragment (#...)",
            if raw.contains('@') {
                shown
            } else {
                format!("{:?}", parsed.origin().ascii_serialization())
            }
        )));
    }
    let mut base = parsed.as_str().trim_end_matches('/').to_string();
    if let Some(stripped) = base.strip_suffix("/api") {
        base = stripped.to_string();
    }
    Ok(base)
}

/// While the breaker is open, sends one probe each time one is due, so that waiting
/// resources learn that Waldur is back even when none of them is trying. Ends when it closes.
/// The largest answer read whole (review m8): far above any page Waldur sends, far below
/// what would hurt the process.
pub const MAX_BODY: usize = 16 << 20;

/// Of an error answer, only this much is read: enough to quote Waldur's words.
pub const MAX_ERROR_BODY: usize = 64 << 10;

/// `s` as one URL path segment: letters, digits and `-` as they are, every other byte
/// percent-encoded.
fn path_segment(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::transport::probe_until_closed;
    use super::*;

    /// Review m9: a UUID from Waldur is put into a path encoded, whatever it holds.
    #[test]
    fn an_odd_uuid_from_waldur_stays_one_path_segment() {
        assert_eq!(path_segment("4c3e00aa"), "4c3e00aa");
        assert_eq!(
            path_segment("../../x?y=1#z"),
            "%2E%2E%2F%2E%2E%2Fx%3Fy%3D1%23z"
        );
    }

    #[test]
    fn base_urls_are_normalised() {
        for (raw, want) in [
            ("https://w.example.com", "https://w.example.com"),
            ("https://w.example.com/", "https://w.example.com"),
            ("https://w.example.com/api/", "https://w.example.com"),
            (
                "https://w.example.com/waldur/api",
                "https://w.example.com/waldur",
            ),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ] {
            assert_eq!(normalise_base(raw).unwrap(), want, "{raw}");
        }
        for bad in ["", "waldur.example.com", "ftp://w.example.com", "https://"] {
            assert!(normalise_base(bad).is_err(), "{bad}");
        }
    }

    /// Review m10, N10: user info, a query or a fragment are refused, and the refusal never
    /// shows the password or the query's values.
    #[test]
    fn urls_with_user_info_query_or_fragment_are_refused_without_quoting_secrets() {
        for bad in [
            "https://u:s3cr3t@w.example.com/",
            "https://s3cr3t@w.example.com/api/",
            "https://w.example.com/?token=s3cr3t",
            "https://w.example.com/api/#s3cr3t",
            "https://u:s3cr3t@w.example.com/?run=1",
            "https://u:s3cr3t@[bad",
        ] {
            let err = normalise_base(bad).unwrap_err().to_string();
            assert!(!err.contains("s3cr3t"), "{bad}: {err}");
            assert!(err.contains("Waldur URL"), "{err}");
        }
        assert!(
            normalise_base("https://u:p@w.example.com/")
                .unwrap_err()
                .to_string()
                .contains("user name or password")
        );
    }

    #[test]
    fn next_page_comes_from_the_link_header() {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            HeaderValue::from_static(
                "<http://x/api/openstack-server-groups/?page=1&page_size=300>; rel=\"first\", \
                 <http://x/api/openstack-server-groups/?page=3&page_size=300>; rel=\"next\", \
                 <http://x/api/openstack-server-groups/?page=9&page_size=300>; rel=\"last\"",
            ),
        );
        assert_eq!(next_page(&h), Some(3));
        h.insert(
            reqwest::header::LINK,
            HeaderValue::from_static(
                "<http://x/?page=1>; rel=\"first\", <http://x/?page=1>; rel=\"last\"",
            ),
        );
        assert_eq!(next_page(&h), None);
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let settings = ClientSettings::new("https://w.example.com", Token::new("s3cr3t-t0ken"));
        let client = WaldurClient::new(&settings).unwrap();
        let shown = format!("{settings:?} {client:?}");
        assert!(!shown.contains("s3cr3t-t0ken"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[derive(Default)]
    struct Refusals(std::sync::atomic::AtomicUsize);

    impl Observer for Refusals {
        fn observe(&self, _: Endpoint, _: Option<u16>, _: Duration, _: Duration) {}
        fn refused(&self, _: Endpoint) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn open(b: &Breaker) {
        breaker::force_open(b);
    }

    /// Review N1 (E4b): while another client's probe hangs, the prober waits for it (or for
    /// the next second) instead of asking the breaker again in a tight loop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_prober_waits_while_another_probe_is_in_flight() {
        let b = Arc::new(Breaker::new("http://127.0.0.1:9"));
        let refusals = Arc::new(Refusals::default());
        let settings = ClientSettings::new("http://127.0.0.1:9", Token::new("t"));
        let client = WaldurClient::new(&settings)
            .unwrap()
            .with_breaker(b.clone())
            .with_observer(refusals.clone());
        open(&b);
        tokio::time::sleep(breaker::PROBE_EVERY).await;
        let held = b.admit("list").unwrap();
        let prober = tokio::spawn(probe_until_closed(client));
        tokio::time::sleep(Duration::from_secs(3)).await;
        prober.abort();
        let refused = refusals.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(refused < 10, "{refused} refused probes in 3 s");
        drop(held);
    }

    /// Review m11: a server that echoes the token in any error body, whatever the status,
    /// never makes it show in an error (and so in logs, status or Events).
    #[test]
    fn every_error_that_quotes_a_body_is_redacted() {
        let settings = ClientSettings::new("https://w.example.com", Token::new("s3cr3t-t0ken"));
        let client = WaldurClient::new(&settings).unwrap();
        let echo = "you sent Token s3cr3t-t0ken";
        for status in [400, 401, 403, 404, 409, 418, 429, 500] {
            let json = format!("{{\"detail\": \"{echo}\"}}");
            for body in [json.as_bytes(), echo.as_bytes()] {
                let err = client.redact(WaldurError::from_response("list", status, body, None));
                let shown = format!("{err} {err:?} {}", err.waldur_message());
                assert!(!shown.contains("s3cr3t-t0ken"), "{status}: {shown}");
            }
        }
    }

    #[test]
    fn bad_settings_are_reported_before_any_request() {
        let mut s = ClientSettings::new("https://w.example.com", Token::new(""));
        assert!(
            matches!(WaldurClient::new(&s), Err(WaldurError::Config(m)) if m.contains("empty"))
        );
        s.token = Token::new("t");
        s.ca_bundle_pem = Some(b"not a certificate".to_vec());
        assert!(
            matches!(WaldurClient::new(&s), Err(WaldurError::Config(m)) if m.contains("CA bundle"))
        );
    }
}
