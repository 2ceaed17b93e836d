//! Kubernetes Events, one writer for the process.
//!
//! What kube's `Recorder` does, in a fraction of the memory: an Event repeated for the same
//! object (same type, action and reason, within six minutes) becomes one Event with a series
//! count instead of a new object each time (review M10). kube's recorder keeps a full copy of
//! every Event it wrote for those six minutes, in a map rehashed and scanned on every publish;
//! at 10,000 new ServerGroups (two Events each) that map was the largest thing in the process
//! (about 45 MiB live, 135 MiB at its peak while it grew: see CONTRIBUTING.md, "Where the memory
//! goes"). Here a repeat needs only the Event's name and its count, so that is all that is kept.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};
use serde_json::json;

/// How long a written Event can still gain a repeat (kube's recorder uses the same).
const SERIES_WINDOW_MS: i64 = 6 * 60 * 1000;

/// How often the map is cleared of Events too old to repeat.
const PRUNE_EVERY_MS: i64 = 30 * 1000;

/// An Event written recently: enough to add a repeat to it. Its name is
/// `<object name>.<creation time in ns, hex>`, so the time is all that is kept of it.
#[derive(Debug)]
struct Written {
    created_ns: i128,
    count: i32,
    last_ms: i64,
}

#[derive(Default)]
struct Recent {
    by_key: HashMap<u64, Written>,
    pruned_ms: i64,
}

pub struct EventWriter {
    client: Client,
    reporter: Reporter,
    recent: Mutex<Recent>,
}

/// What a repeat is matched on: the reporter (one per process) and the object, type, action
/// and reason. Not the note: a repeated failure whose words change stays one series.
fn key(ev: &Event, regarding: &ObjectReference) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    matches!(ev.type_, EventType::Warning).hash(&mut h);
    ev.action.hash(&mut h);
    ev.reason.hash(&mut h);
    regarding.uid.hash(&mut h);
    regarding.namespace.hash(&mut h);
    regarding.name.hash(&mut h);
    regarding.kind.hash(&mut h);
    regarding.api_version.hash(&mut h);
    h.finish()
}

/// What to do for an Event: write a new one, or add a repeat to the one created at
/// `created_ns` (its new count).
#[derive(Debug, PartialEq)]
enum Publish {
    New,
    Repeat { created_ns: i128, count: i32 },
}

impl Recent {
    /// Forgets Events too old to repeat, at most every [`PRUNE_EVERY_MS`]: one pass over the
    /// map every half minute, not on every Event.
    fn prune(&mut self, now_ms: i64) {
        if now_ms - self.pruned_ms < PRUNE_EVERY_MS {
            return;
        }
        self.pruned_ms = now_ms;
        self.by_key
            .retain(|_, w| w.last_ms + SERIES_WINDOW_MS > now_ms);
        self.by_key.shrink_to_fit();
    }

    fn decide(&mut self, key: u64, now_ms: i64) -> Publish {
        self.prune(now_ms);
        match self.by_key.get(&key) {
            Some(w) if w.last_ms + SERIES_WINDOW_MS > now_ms => Publish::Repeat {
                created_ns: w.created_ns,
                count: w.count + 1,
            },
            _ => Publish::New,
        }
    }

    fn wrote(&mut self, key: u64, created_ns: i128, count: i32, now_ms: i64) {
        self.by_key.insert(
            key,
            Written {
                created_ns,
                count,
                last_ms: now_ms,
            },
        );
    }
}

impl EventWriter {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            recent: Mutex::new(Recent::default()),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the Event about `regarding`, or counts it as a repeat of a recent one.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let now_ms = now.as_millisecond();
        let key = key(ev, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let decision = self.recent().decide(key, now_ms);
        if let Publish::Repeat { created_ns, count } = decision {
            let name = self.name(regarding, created_ns);
            let series = EventSeries {
                count,
                last_observed_time: MicroTime(now),
            };
            // The latest words too (review N15): a series of failures whose message changed
            // shows what is wrong now, not what was wrong first.
            let patch = json!({ "series": series, "note": ev.note });
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.recent().wrote(key, created_ns, count, now_ms);
                    return Ok(());
                }
                // Expired from the cluster (an Event lives an hour by default): a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = self.new_event(ev, regarding, now);
        events.create(&PostParams::default(), &event).await?;
        self.recent().wrote(key, now.as_nanosecond(), 1, now_ms);
        Ok(())
    }

    /// The name of the Event about `regarding` created at `created_ns`.
    fn name(&self, regarding: &ObjectReference, created_ns: i128) -> String {
        let object = regarding
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller);
        format!("{object}.{created_ns:x}")
    }

    fn new_event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let instance = self
            .reporter
            .instance
            .clone()
            .unwrap_or_else(|| self.reporter.controller.clone());
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(self.name(regarding, now.as_nanosecond())),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(instance),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            related: ev.secondary.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        }
    }

    fn obj(name: &str) -> ObjectReference {
        ObjectReference {
            namespace: Some("team-a".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            kind: Some("ServerGroup".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_repeat_within_six_minutes_adds_to_the_series_whatever_its_note() {
        let mut recent = Recent::default();
        let k = key(&ev("Unauthorized", "401: token expired"), &obj("web"));
        assert_eq!(
            k,
            key(&ev("Unauthorized", "403: no permission"), &obj("web")),
            "the note is not part of the key"
        );
        assert_ne!(k, key(&ev("Forbidden", "x"), &obj("web")));
        assert_ne!(k, key(&ev("Unauthorized", "x"), &obj("db")));
        assert_eq!(recent.decide(k, 1_000), Publish::New);
        recent.wrote(k, 0x17a, 1, 1_000);
        assert_eq!(
            recent.decide(k, 60_000),
            Publish::Repeat {
                created_ns: 0x17a,
                count: 2
            }
        );
        recent.wrote(k, 0x17a, 2, 60_000);
        assert_eq!(
            recent.decide(k, 60_000 + SERIES_WINDOW_MS),
            Publish::New,
            "six minutes after the last repeat, a new Event"
        );
    }

    #[test]
    fn old_events_are_forgotten_in_one_pass_every_half_minute() {
        let mut recent = Recent::default();
        for i in 0..1_000u64 {
            recent.wrote(i, 1, 1, 0);
        }
        recent.wrote(5_000, 2, 1, SERIES_WINDOW_MS);
        recent.prune(SERIES_WINDOW_MS + 1);
        assert_eq!(recent.by_key.len(), 1);
        recent.wrote(6_000, 3, 1, 0);
        recent.prune(SERIES_WINDOW_MS + 2);
        assert_eq!(recent.by_key.len(), 2, "not again within half a minute");
    }
}
