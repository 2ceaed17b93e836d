//! Which Waldur, with which token, a resource is reconciled against.
//!
//! A resource names a Secret in its own namespace (`token`, optional `url`), or uses the
//! operator's defaults. The Secret is read on every reconcile, so a rotated token is used
//! without a restart; clients are cached per (url, token) so connections are reused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// Clients per (url, token), built from one template of timeouts and TLS settings. Every
/// client shares one limiter and one observer, given at construction, so that no client (the
/// default credentials' included) can escape the request budget or the metrics.
pub struct ClientCache {
    template: ClientSettings,
    defaults: DefaultCredentials,
    clients: Mutex<HashMap<(String, Token), WaldurClient>>,
    /// One per Waldur address, shared by every token that talks to it.
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    limiter: Arc<Limiter>,
    observer: Arc<dyn Observer>,
}

/// A client and a key naming its credentials (address and a fingerprint of the token, never
/// the token itself), to share per-credentials state such as the read index.
pub struct Credentials {
    pub key: String,
    pub client: WaldurClient,
    /// The credentialsRef Secret as read, to keep it while the resource needs it.
    pub secret: Option<Secret>,
}

/// Old entries are dropped past this many, so rotated tokens do not pile up.
const MAX_CLIENTS: usize = 256;

impl ClientCache {
    /// `template.url` and `template.token` are ignored; each client gets its own.
    pub fn new(
        template: ClientSettings,
        defaults: DefaultCredentials,
        limiter: Arc<Limiter>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        Self {
            template,
            defaults,
            clients: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            limiter,
            observer,
        }
    }

    /// The breaker of the Waldur at `base` (a normalised base URL), made on first use.
    pub fn breaker(&self, base: &str) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        breakers
            .entry(base.to_string())
            .or_insert_with(|| Arc::new(Breaker::new(base)))
            .clone()
    }

    pub fn client(&self, url: &str, token: &Token) -> Result<WaldurClient, Error> {
        let key = (url.to_string(), token.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let mut settings = self.template.clone();
        settings.url = url.to_string();
        settings.token = token.clone();
        let client = WaldurClient::new(&settings)?
            .with_limiter(self.limiter.clone())
            .with_observer(self.observer.clone());
        let breaker = self.breaker(client.base_url());
        let client = client.with_breaker(breaker);
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// The client for this resource, or `CredentialsNotFound` saying what is missing.
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
        let url = secret_value(&secret, "url")
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .or_else(|| self.defaults.url.clone())
            .ok_or_else(|| {
                Error::CredentialsNotFound(format!(
                    "Secret {namespace}/{name} has no key \"url\" and the operator has no default Waldur URL"
                ))
            })?;
        Ok((url, Token::new(token), Some(secret)))
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
