//! Which Waldur, with which token, a resource is reconciled against.
//!
//! A resource names a Secret in its own namespace (`token`, optional `url`), or uses the
//! operator's defaults. The Secret is read on every reconcile, so a rotated token is used
//! without a restart; clients are cached per (url, token) so connections are reused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::error::Error;
use crate::api::ServerGroup;
use crate::waldur::{Breaker, ClientSettings, Limiter, Observer, Token, WaldurClient};

/// The operator's own Waldur address and token (flags and environment), and the namespaces
/// whose resources may use them.
#[derive(Clone, Debug, Default)]
pub struct DefaultCredentials {
    pub url: Option<String>,
    pub token: Option<Token>,
    pub scope: DefaultScope,
}

/// Where the default credentials may be used: decided by the cluster admin (a flag, a chart
/// value), never by whoever may create a ServerGroup. Without a credentialsRef, a resource in
/// any other namespace is refused, so a namespace user cannot act in Waldur as the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefaultScope {
    /// Exact names, or prefixes (written `team-*`); `*` alone is every namespace. Empty: none.
    patterns: Vec<String>,
}

impl DefaultScope {
    /// Parses a comma-separated list such as `team-a,team-b`, `team-*` or `*`.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let name = item.strip_suffix('*').unwrap_or(item);
            let valid = name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && name.len() <= 63;
            if !valid {
                return Err(format!(
                    "{item:?} is not a namespace name or a prefix ending in *"
                ));
            }
            patterns.push(item.to_string());
        }
        Ok(Self { patterns })
    }

    pub fn all() -> Self {
        Self {
            patterns: vec!["*".into()],
        }
    }

    pub fn allows(&self, namespace: &str) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => namespace.starts_with(prefix),
            None => p == namespace,
        })
    }

    /// For the start-up log line and error messages.
    pub fn describe(&self) -> String {
        if self.patterns.is_empty() {
            "no namespace".into()
        } else {
            self.patterns.join(",")
        }
    }
}

/// The hosts a Secret's `url` may name (review m10, N5): decided by the cluster admin
/// (`--allowed-waldur-hosts`), never by whoever may write a Secret. Empty means any host, as
/// before this list existed, so upgrading changes nothing until the admin sets it. The
/// default Waldur's host (`--waldur-url`) is always allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    /// Exact host names (or IP addresses), or `*.example.com` for any name under it.
    patterns: Vec<String>,
}

impl AllowedHosts {
    /// Parses a comma-separated list such as `waldur.example.com,*.waldur.example.org`.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let item = item.to_ascii_lowercase();
            let name = item.strip_prefix("*.").unwrap_or(&item);
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
                && !name.contains('*');
            if !valid {
                return Err(format!(
                    "{item:?} is not a host name (waldur.example.com) or a pattern such as \
                     *.example.com (no scheme, port or path)"
                ));
            }
            patterns.push(item);
        }
        Ok(Self { patterns })
    }

    /// Whether a Secret may name `host` (as `url::Url::host_str` gives it, lower case).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.patterns.is_empty()
            || self.patterns.iter().any(|p| match p.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => *p == host,
            })
    }

    /// For the start-up log line and error messages.
    pub fn describe(&self) -> String {
        if self.patterns.is_empty() {
            "any host".into()
        } else {
            self.patterns.join(",")
        }
    }
}

/// Clients per (url, token), built from one template of timeouts and TLS settings. Every
/// client shares one limiter and one observer, given at construction, so that no client (the
/// default credentials' included) can escape the request budget or the metrics.
pub struct ClientCache {
    template: ClientSettings,
    defaults: DefaultCredentials,
    clients: Mutex<HashMap<(String, Token), (WaldurClient, Instant)>>,
    /// One per Waldur address, shared by every token that talks to it, with its last use.
    breakers: Mutex<HashMap<String, (Arc<Breaker>, Instant)>>,
    limiter: Arc<Limiter>,
    observer: Arc<dyn Observer>,
    allowed_hosts: AllowedHosts,
    /// The default Waldur's base URL: always allowed, and exempt from the per-Waldur cap.
    default_base: Option<String>,
    /// Clients and breakers unused this long are dropped (review N10).
    idle_after: Duration,
    last_prune: Mutex<Instant>,
}

/// A client and a key naming its credentials (address and a fingerprint of the token, never
/// the token itself), to share per-credentials state such as the read index.
pub struct Credentials {
    pub key: String,
    pub client: WaldurClient,
    /// The credentialsRef Secret as read, to keep it while the resource needs it.
    pub secret: Option<Secret>,
}

/// The least recently used entry is dropped past this many, so rotated tokens do not pile up.
const MAX_CLIENTS: usize = 256;
/// Until `with_idle_after` says otherwise: three default resync periods, as the index.
const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(30 * 60);

impl ClientCache {
    /// `template.url` and `template.token` are ignored; each client gets its own.
    pub fn new(
        template: ClientSettings,
        defaults: DefaultCredentials,
        limiter: Arc<Limiter>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let default_base = defaults
            .url
            .as_deref()
            .and_then(|u| crate::waldur::normalise_base(u).ok());
        Self {
            template,
            defaults,
            clients: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            limiter,
            observer,
            allowed_hosts: AllowedHosts::default(),
            default_base,
            idle_after: DEFAULT_IDLE_AFTER,
            last_prune: Mutex::new(Instant::now()),
        }
    }

    /// Restricts the hosts a Secret's `url` may name.
    pub fn with_allowed_hosts(mut self, hosts: AllowedHosts) -> Self {
        self.allowed_hosts = hosts;
        self
    }

    /// Drops clients and per-Waldur breakers (and their metric series) unused this long. The
    /// operator passes three resync periods, as for the read index's shards: every resource
    /// reconciles at least once per resync period, so only addresses no resource uses any
    /// more are dropped.
    pub fn with_idle_after(mut self, idle: Duration) -> Self {
        self.idle_after = idle;
        self
    }

    /// The breaker of the Waldur at `base` (a normalised base URL), made on first use.
    pub fn breaker(&self, base: &str) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        let entry = breakers.entry(base.to_string()).or_insert_with(|| {
            (
                Arc::new(Breaker::new(base).with_request_timeout(self.template.timeout)),
                Instant::now(),
            )
        });
        entry.1 = Instant::now();
        entry.0.clone()
    }

    /// How many Waldur addresses have a breaker now (for tests).
    pub fn breaker_count(&self) -> usize {
        self.breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn client(&self, url: &str, token: &Token) -> Result<WaldurClient, Error> {
        self.prune_if_due();
        let key = (url.to_string(), token.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, used)) = clients.get_mut(&key) {
            *used = Instant::now();
            let c = c.clone();
            drop(clients);
            // Keeps the breaker's last use fresh too.
            self.breaker(c.base_url());
            return Ok(c);
        }
        let mut settings = self.template.clone();
        settings.url = url.to_string();
        settings.token = token.clone();
        let mut client = WaldurClient::new(&settings)?
            .with_limiter(self.limiter.clone())
            .with_observer(self.observer.clone());
        if self.default_base.as_deref() == Some(client.base_url()) {
            client = client.without_waldur_cap();
        }
        let breaker = self.breaker(client.base_url());
        let client = client.with_breaker(breaker);
        // Full: the least recently used client goes, not all of them (review m13: clearing
        // the table made every resource rebuild its client at once).
        if clients.len() >= MAX_CLIENTS
            && let Some(oldest) = clients
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            clients.remove(&oldest);
        }
        clients.insert(key, (client.clone(), Instant::now()));
        Ok(client)
    }

    /// Prunes at most ten times per idle period: cheap, and no task of its own to manage.
    fn prune_if_due(&self) {
        let mut last = self.last_prune.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < self.idle_after / 10 {
            return;
        }
        *last = Instant::now();
        drop(last);
        self.prune();
    }

    /// Drops clients, and breakers with their `waldur_unreachable` series, unused for
    /// `idle_after` (review N10): a Secret's `url` may name many addresses over time. A closed
    /// breaker still held elsewhere (an index shard's client) stays until it is let go, so a
    /// Waldur never has two breakers at once; an open one is retired, which stops its prober.
    pub fn prune(&self) {
        let idle = self.idle_after;
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, used)| used.elapsed() <= idle);
        let mut forgotten = Vec::new();
        self.breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|base, (breaker, used)| {
                if used.elapsed() <= idle {
                    return true;
                }
                let held_elsewhere = Arc::strong_count(breaker) > 1;
                if held_elsewhere && !breaker.is_open() {
                    return true;
                }
                breaker.retire();
                forgotten.push(base.clone());
                false
            });
        for base in forgotten {
            tracing::debug!(waldur = %base, "Waldur unused for {idle:?}: its breaker is dropped");
            self.observer.breaker_forgotten(&base);
        }
    }

    /// The client for this resource, or `CredentialsNotFound` saying what is missing.
    /// Whether `base` is the operator's default Waldur (the admin's own, exempt from the
    /// per-URL shares that keep one namespace's Waldur from starving the others).
    pub fn is_default(&self, base: &str) -> bool {
        self.default_base.as_deref() == Some(base)
    }

    pub async fn for_resource(
        &self,
        kube: &kube::Client,
        sg: &ServerGroup,
    ) -> Result<Credentials, Error> {
        let (url, token, secret) = self.resolve(kube, sg).await?;
        let client = self.client(&url, &token)?;
        Ok(Credentials {
            // Keyed by the normalised address: `https://w` and `https://w/api/` are one Waldur.
            key: format!("{}#{:016x}", client.base_url(), fingerprint(&token)),
            client,
            secret,
        })
    }

    async fn resolve(
        &self,
        kube: &kube::Client,
        sg: &ServerGroup,
    ) -> Result<(String, Token, Option<Secret>), Error> {
        let Some(reference) = &sg.spec.credentials_ref else {
            let namespace = sg.metadata.namespace.as_deref().unwrap_or_default();
            if !self.defaults.scope.allows(namespace) {
                return Err(Error::DefaultCredentialsNotAllowed(format!(
                    "ServerGroups in namespace {namespace} may not use the operator's default \
                     Waldur credentials (allowed in: {}). Set spec.credentialsRef to a Secret \
                     in {namespace} holding a Waldur token, or ask the cluster admin to add \
                     {namespace} to --default-credentials-namespaces (Helm value \
                     defaultCredentials.namespaces)",
                    self.defaults.scope.describe()
                )));
            }
            let url = self.defaults.url.as_deref().ok_or_else(|| {
                Error::CredentialsNotFound(
                    "no spec.credentialsRef and the operator has no default Waldur URL (--waldur-url / WALDUR_URL)".into(),
                )
            })?;
            let token = self.defaults.token.as_ref().ok_or_else(|| {
                Error::CredentialsNotFound(
                    "no spec.credentialsRef and the operator has no default token (WALDUR_TOKEN / --waldur-token-file)".into(),
                )
            })?;
            return Ok((url.to_string(), token.clone(), None));
        };
        let namespace = sg.metadata.namespace.as_deref().unwrap_or("default");
        let secrets: Api<Secret> = Api::namespaced(kube.clone(), namespace);
        let name = &reference.name;
        let secret = secrets.get_opt(name).await?.ok_or_else(|| {
            Error::CredentialsNotFound(format!("Secret {namespace}/{name} not found"))
        })?;
        let token = secret_value(&secret, "token")
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                Error::CredentialsNotFound(format!(
                    "Secret {namespace}/{name} has no key \"token\""
                ))
            })?;
        let own_url = secret_value(&secret, "url")
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty());
        let url = match own_url {
            Some(url) => {
                self.check_secret_url(&url, namespace, name)?;
                url
            }
            None => self.defaults.url.clone().ok_or_else(|| {
                Error::CredentialsNotFound(format!(
                    "Secret {namespace}/{name} has no key \"url\" and the operator has no default Waldur URL"
                ))
            })?,
        };
        Ok((url, Token::new(token), Some(secret)))
    }

    /// A Secret's `url` must be a clean base URL (no user info, query or fragment) on a host
    /// the admin allows. Refusals become `Synced=False CredentialsNotFound` with a message
    /// that never quotes the URL itself (it may hold a password), only its host.
    fn check_secret_url(&self, url: &str, namespace: &str, name: &str) -> Result<(), Error> {
        let base = crate::waldur::normalise_base(url).map_err(|e| {
            Error::CredentialsNotFound(format!(
                "Secret {namespace}/{name}, key \"url\": {}",
                e.waldur_message()
            ))
        })?;
        let host = url::Url::parse(&base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        let default_host = self
            .default_base
            .as_deref()
            .and_then(|b| url::Url::parse(b).ok())
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        if default_host.as_deref() == Some(host.as_str()) || self.allowed_hosts.allows(&host) {
            return Ok(());
        }
        Err(Error::CredentialsNotFound(format!(
            "Secret {namespace}/{name}, key \"url\": the host {host} is not one the cluster admin \
             allows for Waldur ({}). Use an allowed Waldur, or ask the admin to add it to \
             --allowed-waldur-hosts (Helm value allowedWaldurHosts)",
            self.allowed_hosts.describe()
        )))
    }
}

fn fingerprint(token: &Token) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.expose().hash(&mut h);
    h.finish()
}

/// The ServerGroups whose `credentialsRef` names the Secret `namespace/name`: the ones to
/// reconcile again when that Secret changes, so a fixed or rotated token is used at once.
pub fn referencing(
    groups: &[std::sync::Arc<ServerGroup>],
    namespace: Option<&str>,
    name: Option<&str>,
) -> Vec<kube::runtime::reflector::ObjectRef<ServerGroup>> {
    groups
        .iter()
        .filter(|sg| sg.metadata.namespace.as_deref() == namespace)
        .filter(|sg| sg.spec.credentials_ref.as_ref().map(|r| r.name.as_str()) == name)
        .map(|sg| kube::runtime::reflector::ObjectRef::from_obj(sg.as_ref()))
        .collect()
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CredentialsRef, ServerGroupSpec};
    use std::sync::Arc;

    fn sg(ns: &str, name: &str, secret: Option<&str>) -> Arc<ServerGroup> {
        let mut sg = ServerGroup::new(
            name,
            ServerGroupSpec {
                credentials_ref: secret.map(|s| CredentialsRef { name: s.into() }),
                ..Default::default()
            },
        );
        sg.metadata.namespace = Some(ns.into());
        Arc::new(sg)
    }

    #[test]
    fn the_default_scope_allows_exactly_what_the_admin_listed() {
        let scope = DefaultScope::parse("team-a, ci-*").unwrap();
        assert!(scope.allows("team-a"));
        assert!(scope.allows("ci-42"));
        assert!(!scope.allows("team-ab"));
        assert!(!scope.allows("kube-system"));
        assert!(!DefaultScope::parse("").unwrap().allows("team-a"));
        assert!(DefaultScope::all().allows("anything"));
        assert!(DefaultScope::parse("*").unwrap().allows("kube-system"));
        assert!(DefaultScope::parse("Team_A").is_err());
    }

    /// Outside the allowed namespaces a resource without credentialsRef is refused before
    /// anything is sent, and the message says what to do; a credentialsRef is unaffected.
    #[tokio::test]
    async fn a_namespace_outside_the_scope_cannot_use_the_default_token() {
        let cache = ClientCache::new(
            ClientSettings::new("", Token::new("")),
            DefaultCredentials {
                url: Some("http://127.0.0.1:9".into()),
                token: Some(Token::new("staff-token")),
                scope: DefaultScope::parse("team-a").unwrap(),
            },
            Arc::new(crate::waldur::Limiter::new(Default::default())),
            Arc::new(crate::metrics::Metrics::new()),
        );
        // Never reached: the refusal comes before any Kubernetes or Waldur call.
        let kube = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
            .unwrap();
        let err = cache
            .for_resource(&kube, &sg("team-b", "web", None))
            .await
            .err()
            .expect("refused");
        assert_eq!(err.reason(), "DefaultCredentialsNotAllowed");
        let message = err.message();
        assert!(
            message.contains("team-b") && message.contains("credentialsRef"),
            "{message}"
        );
        assert!(!message.contains("staff-token"));
        assert!(
            cache
                .for_resource(&kube, &sg("team-a", "web", None))
                .await
                .is_ok()
        );
    }

    /// Review m13: a full table lets go of its least recently used client only; the others
    /// (and so their resources' warm connections) stay.
    #[test]
    fn a_full_client_table_drops_only_the_least_recently_used() {
        let c = cache("https://waldur.example.com", "");
        let url = "https://waldur.example.com/api/";
        let first = c.client(url, &Token::new("token-0")).unwrap();
        for i in 1..MAX_CLIENTS {
            std::thread::sleep(std::time::Duration::from_micros(10));
            c.client(url, &Token::new(format!("token-{i}"))).unwrap();
        }
        // token-0 used again: now token-1 is the oldest.
        std::thread::sleep(std::time::Duration::from_micros(10));
        c.client(url, &Token::new("token-0")).unwrap();
        c.client(url, &Token::new("one-more")).unwrap();
        let clients = c.clients.lock().unwrap();
        assert_eq!(clients.len(), MAX_CLIENTS);
        let has = |t: &str| clients.contains_key(&(url.to_string(), Token::new(t)));
        assert!(has("token-0") && has("one-more") && has("token-2"));
        assert!(!has("token-1"), "the least recently used went");
        drop(first);
    }

    fn cache(defaults_url: &str, hosts: &str) -> ClientCache {
        ClientCache::new(
            ClientSettings::new("", Token::new("")),
            DefaultCredentials {
                url: Some(defaults_url.into()),
                token: Some(Token::new("staff-token")),
                scope: DefaultScope::all(),
            },
            Arc::new(crate::waldur::Limiter::new(Default::default())),
            Arc::new(crate::metrics::Metrics::new()),
        )
        .with_allowed_hosts(AllowedHosts::parse(hosts).unwrap())
    }

    #[test]
    fn allowed_hosts_match_names_and_subdomain_patterns() {
        let hosts = AllowedHosts::parse("waldur.example.com, *.waldur.example.org").unwrap();
        assert!(hosts.allows("waldur.example.com"));
        assert!(hosts.allows("WALDUR.example.com"));
        assert!(hosts.allows("eu.waldur.example.org"));
        assert!(hosts.allows("a.b.waldur.example.org"));
        assert!(
            !hosts.allows("waldur.example.org"),
            "the pattern is for names under it"
        );
        assert!(!hosts.allows("evilwaldur.example.org"));
        assert!(!hosts.allows("waldur.example.com.evil.net"));
        assert!(!hosts.allows("127.0.0.1"));
        assert!(
            AllowedHosts::parse("").unwrap().allows("anything"),
            "empty: any host"
        );
        for bad in [
            "https://w.example.com",
            "w.example.com/api",
            "*example.com",
            "a*.b",
        ] {
            assert!(AllowedHosts::parse(bad).is_err(), "{bad}");
        }
    }

    /// Review m10: the admin's list restricts a Secret's `url`; the default Waldur's host is
    /// always allowed; the refusal is CredentialsNotFound and names the host only.
    #[tokio::test]
    async fn a_secret_url_must_name_an_allowed_host() {
        let c = cache("https://waldur.example.com", "*.trusted.example");
        assert!(
            c.check_secret_url("https://waldur.example.com/api/", "ns", "s")
                .is_ok()
        );
        assert!(
            c.check_secret_url("https://eu.trusted.example", "ns", "s")
                .is_ok()
        );
        let err = c
            .check_secret_url("https://attacker.example.net:8443/x", "ns", "s")
            .unwrap_err();
        assert_eq!(err.reason(), "CredentialsNotFound");
        let m = err.message();
        assert!(
            m.contains("attacker.example.net") && m.contains("--allowed-waldur-hosts"),
            "{m}"
        );
        assert!(m.contains("ns/s"), "{m}");
        // No list: any host, as before.
        let open = cache("https://waldur.example.com", "");
        assert!(
            open.check_secret_url("https://elsewhere.example.net", "ns", "s")
                .is_ok()
        );
    }

    /// Review m10, N10: user info, a query or a fragment in a Secret's `url` are refused as
    /// CredentialsNotFound, and the message never holds the password or the query.
    #[tokio::test]
    async fn a_secret_url_with_user_info_or_a_query_is_refused_without_quoting_it() {
        let c = cache("https://waldur.example.com", "");
        for bad in [
            "https://u:s3cr3t@waldur.example.com/",
            "https://waldur.example.com/api/?token=s3cr3t",
            "https://waldur.example.com/#s3cr3t",
        ] {
            let err = c.check_secret_url(bad, "ns", "s").unwrap_err();
            assert_eq!(err.reason(), "CredentialsNotFound", "{bad}");
            let m = err.message();
            assert!(!m.contains("s3cr3t") && m.contains("ns/s"), "{m}");
        }
    }

    /// Review N10: clients and breakers of a Waldur nobody used for the idle period are
    /// dropped with their metric series; those in use stay.
    #[tokio::test(start_paused = true)]
    async fn breakers_and_series_of_unused_waldurs_are_dropped() {
        let metrics = crate::metrics::Metrics::new();
        let c = ClientCache::new(
            ClientSettings::new("", Token::new("")),
            DefaultCredentials::default(),
            Arc::new(crate::waldur::Limiter::new(Default::default())),
            Arc::new(metrics.clone()),
        )
        .with_idle_after(Duration::from_secs(600));
        let t = Token::new("t");
        let gone = c.client("https://gone.example.com", &t).unwrap();
        let open = c.client("https://open.example.com", &t).unwrap();
        crate::waldur::breaker::force_open(open.breaker().unwrap());
        use crate::waldur::Observer;
        metrics.breaker_changed("https://gone.example.com", false);
        metrics.breaker_changed("https://open.example.com", true);
        drop(gone);
        tokio::time::advance(Duration::from_secs(400)).await;
        c.client("https://kept.example.com", &t).unwrap();
        tokio::time::advance(Duration::from_secs(400)).await;
        c.client("https://kept.example.com", &t).unwrap();
        assert_eq!(c.breaker_count(), 1, "only the Waldur still in use");
        let text = metrics.encode();
        assert!(
            !text.contains("gone.example.com") && !text.contains("open.example.com"),
            "{text}"
        );
        assert_eq!(
            open.breaker().unwrap().until_probe(),
            None,
            "a retired breaker's prober stops"
        );
    }

    #[test]
    fn a_secret_change_wakes_only_the_resources_that_use_it() {
        let groups = vec![
            sg("team-a", "uses", Some("waldur")),
            sg("team-a", "other-secret", Some("other")),
            sg("team-b", "same-name-other-namespace", Some("waldur")),
            sg("team-a", "defaults", None),
        ];
        let woken: Vec<String> = referencing(&groups, Some("team-a"), Some("waldur"))
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(woken, vec!["uses".to_string()]);
    }
}
