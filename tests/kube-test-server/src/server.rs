//! The [`TestServer`] handle and its accept loop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::hooks::{FailRule, Hooks};
use crate::resources::{CRD_GROUP, CRD_PLURAL};
use crate::store::{Store, WriteOpts};

/// Settings of a [`TestServer`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen (port 0: ephemeral).
    pub addr: SocketAddr,
    /// How many watch events are kept for watches that resume from a resourceVersion.
    pub history: usize,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// How long after it happens each watch event (and bookmark) reaches watchers, as a
    /// lagging watch cache would deliver it. Zero (the default): at once.
    pub watch_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            history: 10_000,
            bookmark_interval: Duration::from_secs(1),
            watch_delay: Duration::ZERO,
        }
    }
}

/// State shared by the handle and the request handlers.
pub(crate) struct Shared {
    store: Mutex<Store>,
    hooks: Mutex<Hooks>,
    pub expire: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    pub addr: SocketAddr,
    pub config: Config,
    /// How late watch events reach watchers now, in ms: `Config::watch_delay` at start,
    /// changed at run time by [`TestServer::set_watch_delay`].
    pub watch_delay_ms: Arc<AtomicU64>,
}

/// A poisoned lock only means a handler panicked mid-request; the data is still usable for a
/// test server, and refusing to serve would hide the first panic behind many others.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }
    pub fn hooks(&self) -> MutexGuard<'_, Hooks> {
        lock(&self.hooks)
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A running Kubernetes API test server. Cheap to clone; all clones drive the same server.
#[derive(Clone)]
pub struct TestServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl TestServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start() -> std::io::Result<TestServer> {
        Self::start_with(Config::default()).await
    }

    /// Starts a server on the given address (port 0: ephemeral).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<TestServer> {
        Self::start_with(Config {
            addr,
            ..Config::default()
        })
        .await
    }

    /// Starts a server with explicit settings.
    pub async fn start_with(config: Config) -> std::io::Result<TestServer> {
        let listener = TcpListener::bind(config.addr).await?;
        let local = listener.local_addr()?;
        let addr = if local.ip().is_unspecified() {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), local.port())
        } else {
            local
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (expire, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(config.history)),
            hooks: Mutex::new(Hooks::default()),
            expire,
            shutdown,
            addr,
            watch_delay_ms: Arc::new(AtomicU64::new(
                u64::try_from(config.watch_delay.as_millis()).unwrap_or(u64::MAX),
            )),
            config,
        });
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        Ok(TestServer { shared })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.shared.url()
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig that `kubectl` and `kube::Config` accept: this server, no TLS, a dummy
    /// token, and `namespace` as the context's namespace.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        kubeconfig_yaml(&self.url(), namespace)
    }

    /// A kube client for this server, built from the same kubeconfig a user would get.
    pub async fn client(&self) -> Result<kube::Client, String> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml("default"))
            .map_err(|e| e.to_string())?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        kube::Client::try_from(config).map_err(|e| e.to_string())
    }

    /// Registers a CRD, with the same effect as `POST .../customresourcedefinitions`.
    pub fn install_crd(&self, crd: Value) -> Result<(), String> {
        let mut store = self.shared.store();
        let t = store
            .target(CRD_GROUP, "v1", CRD_PLURAL, None, None)
            .ok_or_else(|| "the CRD resource is not registered".to_string())?;
        store
            .create(&t, crd, &WriteOpts::default(), None)
            .map(|_| ())
            .map_err(|e| e.message)
    }

    /// Creates a Namespace (objects need theirs to exist, as on a real server); one that
    /// exists already is left as it is.
    pub fn create_namespace(&self, name: &str) -> Result<(), String> {
        let mut store = self.shared.store();
        let t = store
            .target("", "v1", "namespaces", None, None)
            .ok_or_else(|| "namespaces are not registered".to_string())?;
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        match store.create(&t, ns, &WriteOpts::default(), None) {
            Ok(_) => Ok(()),
            Err(e) if e.code == 409 => Ok(()),
            Err(e) => Err(e.message),
        }
    }

    /// Stops accepting connections and ends open connections and watches.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// An object as stored (`group` "" is the core group; `namespace` ignored for
    /// cluster-scoped resources, "default" when `None` for namespaced ones).
    pub fn get(
        &self,
        group: &str,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.shared.store().get_raw(group, plural, namespace, name)
    }

    /// All objects of a resource, in all namespaces.
    pub fn list(&self, group: &str, plural: &str) -> Vec<Value> {
        self.shared.store().list_raw(group, plural)
    }

    /// Makes the next `n` requests with this verb (`create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `get`, `list`, `watch`, or `*`) on this resource plural (or `*`)
    /// answer `status` with the API server's Status body for that code. `subresource`: `None`
    /// matches the main resource only, `Some("status")` that subresource, `Some("*")` both.
    /// Server-side apply is a `patch`. A call replaces any pending failures for the same
    /// (verb, plural, subresource); `n == 0` clears them.
    pub fn fail_next(
        &self,
        n: usize,
        verb: &str,
        plural: &str,
        subresource: Option<&str>,
        status: u16,
    ) {
        self.shared.hooks().add_rule(FailRule {
            remaining: n,
            verb: verb.to_string(),
            plural: plural.to_string(),
            subresource: subresource.map(str::to_string),
            status,
        });
    }

    /// From now on, every watch event (and bookmark) reaches watchers `delay` after it
    /// happens, on open watches too: a watch cache that starts (or stops) lagging under load.
    /// Events keep their order, so events sent before a shorter delay was set hold back the
    /// ones after them until they are due.
    pub fn set_watch_delay(&self, delay: Duration) {
        self.shared.watch_delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Ends every open watch stream now (clients must re-watch from their last resourceVersion).
    pub fn expire_watches(&self) {
        self.shared.expire.send_modify(|n| *n += 1);
    }

    /// Drops the watch history: a watch from any resourceVersion handed out before now gets
    /// 410 Gone (open watches go on; combine with [`expire_watches`](Self::expire_watches) to
    /// make every watcher re-watch into a 410 and re-list).
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// create/update/patch/delete/deletecollection requests on a resource, subresources
    /// included.
    pub fn writes(&self, plural: &str) -> u64 {
        self.shared.hooks().writes(plural)
    }

    /// Every write so far, by `resource` or `resource/subresource`.
    pub fn writes_by_resource(&self) -> std::collections::BTreeMap<String, u64> {
        self.shared.hooks().writes_by_resource()
    }

    /// Requests with a verb on a resource (`subresource`: `None` counts all, `Some("")` the
    /// main resource only, `Some("status")` that subresource).
    pub fn count(&self, verb: &str, plural: &str, subresource: Option<&str>) -> u64 {
        self.shared.hooks().count(verb, plural, subresource)
    }

    /// All HTTP requests served (except `/__test/`).
    pub fn requests(&self) -> u64 {
        self.shared.hooks().requests()
    }

    /// Zeroes the request counters.
    pub fn reset_counters(&self) {
        self.shared.hooks().reset();
    }

    /// The JSON served at `GET /__test/stats`.
    pub fn stats(&self) -> Value {
        crate::http::stats(&self.shared)
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }
}

/// The kubeconfig text for a server URL.
pub fn kubeconfig_yaml(url: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kube-test-server
  cluster:
    server: {url}
    insecure-skip-tls-verify: true
users:
- name: kube-test-server
  user:
    token: kube-test-server-token
contexts:
- name: kube-test-server
  context:
    cluster: kube-test-server
    user: kube-test-server
    namespace: {namespace}
current-context: kube-test-server
preferences: {{}}
"
    )
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(crate::http::handle(shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = stop.changed() => {}
            }
        });
    }
}
