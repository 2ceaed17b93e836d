//! The controller's wiring for one leadership term: the watches and their caches, the index,
//! the Secret janitor, and the kube-runtime Controller itself.

use super::*;

/// What the controller runs with.
pub struct Runtime {
    pub kube: Client,
    pub api: Api<ServerGroup>,
    pub secrets: Api<PartialObjectMeta<Secret>>,
    pub settings: Settings,
    pub credentials: Arc<ClientCache>,
    pub concurrency: u16,
    pub read_path: index::ReadPath,
    /// How often the batched read path sweeps while anything is in flight.
    pub busy_sweep: Duration,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// The operator's own namespace, where its claims on Waldur groups live.
    pub claims_namespace: String,
    /// The resources of this shard are the only ones cached and reconciled.
    pub shard: Shard,
    /// The tenant re-syncs asked for, kept for the whole process (not per leadership term).
    pub tenant_pulls: Arc<tenant_pulls::TenantPulls>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    rt: Runtime,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store();
    // The controller never reads managedFields; dropping them keeps the cache small.
    // Lists are consistent reads in pages of 500. (`any_semantic()` would ask for
    // resourceVersion 0, but kube drops it whenever a page size is set, and a watch-cache
    // read could be older than what this process already saw; a relist after 410 must not
    // go back in time.)
    let (groups_synced_tx, groups_synced) = tokio::sync::watch::channel(false);
    let shard = rt.shard;
    let own_writes = Arc::new(OwnWrites::default());
    let failures = Arc::new(Failures::default());
    let held_here = Arc::new(super::claims::HeldHere::default());
    let names = Arc::new(super::names::Names::default());
    let changes = Arc::new(Changes::default());
    let seen = changes.clone();
    let stream = watcher(rt.api, watcher::Config::default())
        .default_backoff()
        // Another shard's resources are neither cached nor reconciled here: each process
        // holds its own part only (a uid never changes, so neither does its shard).
        .filter(move |event| std::future::ready(belongs_to(shard, event)))
        .modify(|sg: &mut ServerGroup| {
            let meta = sg.meta_mut();
            meta.managed_fields = None;
            // `kubectl apply` keeps a copy of the whole manifest in an annotation; the
            // operator never reads it, and it would double what the cache holds per object.
            if let Some(annotations) = meta.annotations.as_mut() {
                annotations.remove(LAST_APPLIED);
            }
        })
        .reflect(writer)
        .inspect({
            let own_writes = own_writes.clone();
            let failures = failures.clone();
            let held_here = held_here.clone();
            let names = names.clone();
            let reader = reader.clone();
            move |e| {
                if let Ok(event) = e {
                    names.apply(event, &reader);
                }
                match e {
                    Ok(watcher::Event::InitDone) => {
                        // The store now holds the relisted objects: what else is remembered per
                        // object belongs to objects deleted while the watch was down.
                        let present: HashSet<String> = reader
                            .state()
                            .iter()
                            .filter_map(|sg| sg.metadata.uid.clone())
                            .collect();
                        own_writes.retain(&present);
                        failures.retain(&present);
                        changes.retain(&reader.state());
                        groups_synced_tx.send_replace(true);
                    }
                    Ok(watcher::Event::Apply(sg) | watcher::Event::InitApply(sg)) => {
                        own_writes.seen(sg);
                    }
                    Ok(watcher::Event::Delete(sg)) => {
                        own_writes.forget(sg);
                        failures.forget(sg);
                        if let Some(uid) = sg.metadata.uid.as_deref() {
                            held_here.forget_holder(uid);
                        }
                        changes.forget(sg);
                    }
                    _ => {}
                }
            }
        })
        .touched_objects()
        // The operator's own status writes come back as watch events; reconciling on them
        // would bypass the error backoff whenever a failure's message changed (review M10).
        .filter(move |obj| std::future::ready(obj.as_ref().map_or(true, |sg| seen.changed(sg))));
    let (wake_tx, wake_rx) = futures::channel::mpsc::unbounded();
    let mut ctx = Context::new(
        rt.kube.clone(),
        rt.settings.clone(),
        rt.credentials,
        reader.clone(),
    )
    .with_metrics(rt.metrics.clone())
    .with_claims_namespace(rt.claims_namespace.clone())
    .with_wake(wake_tx.clone())
    .with_own_writes(own_writes)
    .with_failures(failures)
    .with_held_here(held_here)
    .with_names(names)
    .with_shard(rt.shard)
    .with_tenant_pulls(rt.tenant_pulls.clone())
    // A quarter of the workers, as the limiter's per-URL share of in-flight requests.
    .with_url_worker_quota(usize::from(rt.concurrency / 4).max(1));
    if rt.read_path == index::ReadPath::Batched {
        let timing = index::SweepTiming {
            busy: rt.busy_sweep,
            settled: rt.settings.resync_period,
            after_write: Duration::from_secs(10),
        };
        ctx = ctx.with_index(Arc::new(index::WaldurIndex::new(
            timing,
            reader.clone(),
            wake_tx,
        )));
    }
    let ctx = Arc::new(ctx);
    // Ends with this run, however it ends (a lost lease drops it mid-way): a term of
    // leadership must not leave a task behind that reports its frozen cache for ever.
    let _cache_gauges = AbortOnDrop(tokio::spawn(watch_cache(
        reader.clone(),
        groups_synced.clone(),
        rt.metrics.clone(),
        rt.health.clone(),
    )));
    // Metadata only: the operator reads a Secret's data when it needs it, and keeps no copy.
    let (secret_reader, secret_writer) = reflector::store();
    let (secrets_synced_tx, secrets_synced) = tokio::sync::watch::channel(false);
    let secret_changes = watcher(rt.secrets, watcher::Config::default())
        .default_backoff()
        .modify(strip_secret_meta)
        .reflect(secret_writer)
        .inspect(move |e| {
            if matches!(e, Ok(watcher::Event::InitDone)) {
                secrets_synced_tx.send_replace(true);
            }
        })
        .touched_objects();
    let _secret_janitor = AbortOnDrop(tokio::spawn(release_unused_secrets(
        rt.kube.clone(),
        secret_reader,
        secrets_synced,
        reader.clone(),
        groups_synced,
        rt.shard,
        rt.claims_namespace.clone(),
    )));
    let groups = reader.clone();
    Controller::for_stream(stream, reader)
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| {
            credentials::referencing(
                &groups.state(),
                secret.metadata.namespace.as_deref(),
                secret.metadata.name.as_deref(),
            )
        })
        .reconcile_on(wake_rx)
        .with_config(kube::runtime::controller::Config::default().concurrency(rt.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

/// Takes the operator's finalizer off credentials Secrets that no resource needs any more,
/// every few seconds (the release right after a resource's cleanup is the fast path).
pub(super) async fn release_unused_secrets(
    kube: Client,
    secrets: Store<PartialObjectMeta<Secret>>,
    mut secrets_synced: tokio::sync::watch::Receiver<bool>,
    groups: Store<ServerGroup>,
    mut groups_synced: tokio::sync::watch::Receiver<bool>,
    shard: Shard,
    claims_namespace: String,
) {
    // Both caches complete first: a Secret is never released on a partial view.
    if secrets_synced.wait_for(|s| *s).await.is_err()
        || groups_synced.wait_for(|s| *s).await.is_err()
    {
        return;
    }
    let started = tokio::time::Instant::now();
    let mut claims_checked = started;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        // The finalizers of shards that no longer exist go only after the remaining shards
        // have had time to reconcile what moved to them, and so to hold those Secrets.
        let settled = started.elapsed() >= SHARDS_GONE_AFTER;
        secret_guard::release_unused(&kube, &secrets, &groups, shard, settled).await;
        if claims_checked.elapsed() >= CLAIMS_CHECKED_EVERY {
            claims_checked = tokio::time::Instant::now();
            match claims::release_orphaned(&kube, &claims_namespace, &groups, shard).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(released = n, "released claims whose ServerGroup is gone"),
                Err(e) => tracing::warn!(error = %e, "cannot check the claims on Waldur groups"),
            }
            // Only shard 0 prunes the records of released Nova groups (one list a minute).
            if shard.index == 0
                && let Err(e) = super::released::prune(&kube, &claims_namespace).await
            {
                tracing::warn!(error = %e, "cannot prune the records of released Nova groups");
            }
        }
    }
}

/// What the Secret cache keeps: only names, uids, versions and finalizers are read.
/// Annotations go too: for a Secret applied with kubectl, last-applied-configuration holds its
/// data (review N11), which this process has no business keeping.
fn strip_secret_meta(s: &mut PartialObjectMeta<Secret>) {
    let meta = s.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
}

/// How often claims whose holder is gone are looked for.
pub(super) const CLAIMS_CHECKED_EVERY: Duration = Duration::from_secs(60);

/// How long shard 0 runs before it releases Secrets held by shards that no longer exist.
pub(super) const SHARDS_GONE_AFTER: Duration = Duration::from_secs(120);

/// Aborts a background task when dropped.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks the process ready once the cache holds its first full list, and keeps the
/// resources-by-state gauge current.
///
/// Readiness comes from the watch stream's own InitDone, not `Store::wait_until_ready`:
/// kube-runtime's readiness signal (a oneshot receiver behind a mutex) wakes only the waiter
/// that polled it last, and the controller's runner waits on it too, so a second waiter can
/// sleep for ever (the shipped binary's /readyz stayed 503) or steal the runner's wake-up.
pub(super) async fn watch_cache(
    store: Store<ServerGroup>,
    mut synced: tokio::sync::watch::Receiver<bool>,
    metrics: Metrics,
    health: Arc<Health>,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    health
        .synced
        .store(true, std::sync::atomic::Ordering::SeqCst);
    loop {
        metrics.count_resources(&store.state());
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review N11: a Secret applied with kubectl carries its data in an annotation; the cache
    /// keeps no annotation, label or managed field, only what the guard reads.
    #[test]
    fn the_secret_cache_keeps_no_copy_of_the_data() {
        let mut s: PartialObjectMeta<Secret> = PartialObjectMeta {
            types: None,
            metadata: kube::api::ObjectMeta {
                name: Some("waldur".into()),
                uid: Some("u1".into()),
                finalizers: Some(vec!["openstack.waldur.com/credentials-in-use".into()]),
                annotations: Some(
                    [(
                        "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                        r#"{"stringData":{"token":"s3cr3t"}}"#.to_string(),
                    )]
                    .into(),
                ),
                labels: Some([("team".to_string(), "a".to_string())].into()),
                managed_fields: Some(vec![Default::default()]),
                ..Default::default()
            },
            _phantom: std::marker::PhantomData,
        };
        strip_secret_meta(&mut s);
        assert!(!format!("{:?}", s.metadata).contains("s3cr3t"));
        assert_eq!(s.metadata.annotations, None);
        assert_eq!(s.metadata.labels, None);
        assert_eq!(s.metadata.managed_fields, None);
        assert_eq!(s.metadata.name.as_deref(), Some("waldur"));
        assert_eq!(s.metadata.finalizers.as_ref().map(Vec::len), Some(1));
    }
}
