//! Shared test set-up: the real reconcile, a fake Kubernetes API and the Waldur simulator.
#![allow(dead_code)]

pub mod fake_kube;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use waldur_operator::api::ServerGroup;
use waldur_operator::controller::index::{ReadPath, SweepTiming, WaldurIndex};
use waldur_operator::controller::{self, ClientCache, Context, DefaultCredentials, Settings};
use waldur_operator::metrics::Metrics;
use waldur_operator::waldur::{ClientSettings, Limiter, Limits, Token, WaldurClient};
use waldur_sim::{SimConfig, Simulator};

pub use fake_kube::FakeKube;

pub const NS: &str = "team-a";
pub const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
pub const PLURAL: &str = "servergroups";

pub struct Harness {
    pub kube: FakeKube,
    pub sim: Simulator,
    pub ctx: Arc<Context>,
    writer: std::sync::Mutex<Writer<ServerGroup>>,
}

impl Harness {
    /// The operator's default credentials are the simulator's staff token.
    pub async fn new(config: SimConfig) -> Self {
        Self::with_mode(config, ReadPath::PerObject).await
    }

    pub async fn with_mode(config: SimConfig, mode: ReadPath) -> Self {
        Self::with_settings(config, mode, |_| {}).await
    }

    /// As `with_mode`, with the operator's settings changed by `change`.
    pub async fn with_settings(
        config: SimConfig,
        mode: ReadPath,
        change: impl FnOnce(&mut Settings),
    ) -> Self {
        Self::with_context(config, mode, change, |ctx| ctx).await
    }

    /// As `with_settings`, with the context changed by `wrap` (a shard, say).
    pub async fn with_context(
        config: SimConfig,
        mode: ReadPath,
        change: impl FnOnce(&mut Settings),
        wrap: impl FnOnce(Context) -> Context,
    ) -> Self {
        let staff = config.staff_token.clone();
        let sim = Simulator::start(config)
            .await
            .expect("the simulator starts");
        let kube = FakeKube::default();
        let (reader, writer) = reflector::store();
        let mut template = ClientSettings::new("", Token::new(""));
        template.read_retries = 1;
        template.retry_min_delay = Duration::from_millis(10);
        let credentials = ClientCache::new(
            template,
            DefaultCredentials {
                url: Some(sim.base_url()),
                token: Some(Token::new(staff)),
                scope: controller::DefaultScope::all(),
            },
            Arc::new(Limiter::new(Limits {
                max_in_flight: 16,
                rate_per_second: 0.0,
            })),
            Arc::new(Metrics::new()),
        );
        let mut settings = Settings {
            resync_period: Duration::from_secs(600),
            pull_interval: None,
            reimport_wait: Duration::from_secs(2),
            // Tests drive re-syncs themselves; a floor would only slow them.
            tenant_pull_floor: Duration::from_secs(1),
            ..Settings::default()
        };
        change(&mut settings);
        let mut ctx = Context::new(
            kube.client(),
            settings,
            Arc::new(credentials),
            reader.clone(),
        );
        if mode == ReadPath::Batched {
            let timing = SweepTiming {
                busy: Duration::from_millis(30),
                settled: Duration::from_secs(600),
                after_write: Duration::from_secs(30),
            };
            // Wake-ups are not needed: `converge` reconciles on its own schedule.
            let (wake, _) = futures::channel::mpsc::unbounded();
            ctx = ctx.with_index(Arc::new(WaldurIndex::new(timing, reader, wake)));
        }
        let ctx = Arc::new(wrap(ctx));
        Self {
            kube,
            sim,
            ctx,
            writer: std::sync::Mutex::new(writer),
        }
    }

    pub async fn fast() -> Self {
        Self::new(SimConfig {
            delays: waldur_sim::Delays::fast(),
            ..Default::default()
        })
        .await
    }

    pub async fn fast_mode(mode: ReadPath) -> Self {
        let config = SimConfig {
            delays: waldur_sim::Delays::fast(),
            ..Default::default()
        };
        Self::with_mode(config, mode).await
    }

    /// A staff client straight to the simulator, for out-of-band changes.
    pub fn staff_client(&self) -> WaldurClient {
        let token = Token::new(SimConfig::default().staff_token);
        WaldurClient::new(&ClientSettings::new(self.sim.base_url(), token)).unwrap()
    }

    pub fn apply(&self, name: &str, spec: Value) {
        self.kube.create(
            PLURAL,
            json!({
                "apiVersion": "openstack.waldur.com/v1alpha1",
                "kind": "ServerGroup",
                "metadata": {"name": name, "namespace": NS},
                "spec": spec,
            }),
        );
    }

    pub fn secret(&self, name: &str, token: &str) {
        use base64_like::encode;
        self.kube.create(
            "secrets",
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": NS},
                "data": {"token": encode(token)},
            }),
        );
    }

    pub fn sg(&self, name: &str) -> Option<ServerGroup> {
        self.kube
            .get(PLURAL, NS, name)
            .map(|v| serde_json::from_value(v).expect("a ServerGroup"))
    }

    /// The group `name` is bound to: as its status names it, or as the operator holds it
    /// before status does (a creation whose first status waits).
    #[allow(dead_code)]
    pub fn bound_uuid(&self, name: &str) -> Option<String> {
        let sg = self.sg(name)?;
        sg.status
            .as_ref()
            .and_then(|s| s.uuid.clone())
            .or_else(|| Some(self.ctx.held_here.held_by(&sg)?.0.to_string()))
    }

    /// Runs the real reconcile once on the object as stored now.
    pub async fn reconcile(
        &self,
        name: &str,
    ) -> Result<kube::runtime::controller::Action, controller::Error> {
        self.refresh_store();
        let sg = self.sg(name).expect("the object exists");
        controller::reconcile(Arc::new(sg), self.ctx.clone()).await
    }

    /// Reconciles `stale` as a lagging cache would hand it over: the store holds it too, as
    /// if the watch had not delivered this operator's later writes yet.
    #[allow(dead_code)]
    pub async fn reconcile_as_cached(
        &self,
        stale: ServerGroup,
    ) -> Result<kube::runtime::controller::Action, controller::Error> {
        self.cache_with(&stale);
        controller::reconcile(Arc::new(stale), self.ctx.clone()).await
    }

    /// Relists the store with `stale` in place of the stored object with its uid.
    fn cache_with(&self, stale: &ServerGroup) {
        let objects = self.kube.list(PLURAL).into_iter().map(|obj| {
            let sg: ServerGroup = serde_json::from_value(obj).unwrap();
            if sg.metadata.uid == stale.metadata.uid {
                stale.clone()
            } else {
                sg
            }
        });
        self.relist(objects);
    }

    /// Reconciles `name` while the store holds `stale` in place of the object with its uid, as
    /// if the watch had not delivered that other object's later writes yet.
    #[allow(dead_code)]
    pub async fn reconcile_others_as_cached(
        &self,
        name: &str,
        stale: ServerGroup,
    ) -> Result<kube::runtime::controller::Action, controller::Error> {
        self.cache_with(&stale);
        let sg = self.sg(name).expect("the object exists");
        controller::reconcile(Arc::new(sg), self.ctx.clone()).await
    }

    /// Reconciles until `done` holds (or the object is gone when `done` takes None), as the
    /// controller's requeues would, failing after `limit`.
    pub async fn converge(
        &self,
        name: &str,
        done: impl Fn(Option<&ServerGroup>) -> bool,
    ) -> Option<ServerGroup> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let current = self.sg(name);
            if done(current.as_ref()) {
                return current;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "did not converge: {current:#?}\nevents: {:?}",
                self.kube.event_reasons(name)
            );
            if current.is_some() {
                let _ = self.reconcile(name).await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn refresh_store(&self) {
        let objects = self.kube.list(PLURAL);
        self.relist(
            objects
                .into_iter()
                .map(|o| serde_json::from_value(o).unwrap()),
        );
    }

    /// Relists the cache and the names index fed by the same events, as the watch does.
    fn relist(&self, objects: impl Iterator<Item = ServerGroup>) {
        let mut writer = self.writer.lock().unwrap();
        let mut apply = |event: watcher::Event<ServerGroup>| {
            writer.apply_watcher_event(&event);
            self.ctx.names.apply(&event, &self.ctx.store);
        };
        apply(watcher::Event::Init);
        for sg in objects {
            apply(watcher::Event::InitApply(sg));
        }
        apply(watcher::Event::InitDone);
    }
}

/// (status, reason, message) of a condition.
pub fn condition(sg: &ServerGroup, type_: &str) -> Option<(String, String, String)> {
    sg.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn is_ready(sg: Option<&ServerGroup>) -> bool {
    sg.and_then(|s| condition(s, "Ready"))
        .is_some_and(|c| c.0 == "True")
}

pub fn reason_is(
    type_: &'static str,
    reason: &'static str,
) -> impl Fn(Option<&ServerGroup>) -> bool {
    move |sg| {
        sg.and_then(|s| condition(s, type_))
            .is_some_and(|c| c.1 == reason)
    }
}

/// Base64 without pulling in a crate for one test helper.
pub mod base64_like {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
