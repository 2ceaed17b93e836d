//! Which cached ServerGroups would make their Waldur group under each name: fed by the same
//! watch events as the informer cache, so that the checks before a create ("does another
//! resource hold or make this name?") read the few resources of that name, not all of them.
//!
//! A walk over every cached resource before each create made the operator's CPU grow with
//! the square of the fleet: at 10,000 resources, a quarter of its CPU was spent comparing
//! names (measured with `perf`). The index lags the cache by at most the event in hand, which
//! the checks tolerate: they read a cache that lags the API server anyway, and the claims are
//! what make a binding safe.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use crate::api::ServerGroup;

#[derive(Default)]
pub struct Names {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Waldur name -> the resources that would make their group under it. A short list per
    /// name, boxed strings: about 300 bytes a resource (nested maps cost four times that).
    by_name: HashMap<Box<str>, Vec<Filed>>,
    /// uid -> the name it is filed under, to move it when its name changes.
    name_of: HashMap<Box<str>, Box<str>>,
}

/// Where to find one resource in the cache, and its uid.
struct Filed {
    namespace: Box<str>,
    name: Box<str>,
    uid: Box<str>,
}

/// What is filed of one resource, and under which Waldur name.
struct Entry {
    filed: Filed,
    waldur_name: Box<str>,
}

impl Entry {
    fn of(sg: &ServerGroup) -> Option<Self> {
        Some(Self {
            filed: Filed {
                namespace: sg.metadata.namespace.as_deref().unwrap_or_default().into(),
                name: sg.metadata.name.as_deref()?.into(),
                uid: sg.metadata.uid.as_deref()?.into(),
            },
            waldur_name: sg.waldur_name_str()?.into(),
        })
    }
}

impl Inner {
    fn insert(&mut self, entry: Entry) {
        if self.name_of.get(&entry.filed.uid) == Some(&entry.waldur_name) {
            return;
        }
        self.remove(&entry.filed.uid);
        self.name_of
            .insert(entry.filed.uid.clone(), entry.waldur_name.clone());
        self.by_name
            .entry(entry.waldur_name)
            .or_insert_with(|| Vec::with_capacity(1))
            .push(entry.filed);
    }

    fn remove(&mut self, uid: &str) {
        let Some(name) = self.name_of.remove(uid) else {
            return;
        };
        if let Some(list) = self.by_name.get_mut(&name) {
            list.retain(|f| &*f.uid != uid);
            if list.is_empty() {
                self.by_name.remove(&name);
            }
        }
    }
}

impl Names {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows one watch event, after the reflector has applied it to `cache`. A relist is
    /// read from the cache once it is done (the reflector keeps the relist in progress; until
    /// `InitDone` the old picture stands, as it does in the cache).
    pub fn apply(&self, event: &watcher::Event<ServerGroup>, cache: &Store<ServerGroup>) {
        let mut inner = self.lock();
        match event {
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
            watcher::Event::InitDone => {
                *inner = Inner::default();
                for sg in cache.state() {
                    if let Some(entry) = Entry::of(&sg) {
                        inner.insert(entry);
                    }
                }
            }
            watcher::Event::Apply(sg) => {
                if let Some(entry) = Entry::of(sg) {
                    inner.insert(entry);
                }
            }
            watcher::Event::Delete(sg) => {
                if let Some(uid) = sg.metadata.uid.as_deref() {
                    inner.remove(uid);
                }
            }
        }
    }

    /// The resources that would make their group under `name`.
    pub fn named(&self, name: &str) -> Vec<ObjectRef<ServerGroup>> {
        self.lock()
            .by_name
            .get(name)
            .map(|list| {
                list.iter()
                    .map(|f| ObjectRef::new(&f.name).within(&f.namespace))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ServerGroupSpec;

    fn sg(name: &str, uid: &str, waldur_name: Option<&str>) -> ServerGroup {
        let mut sg = ServerGroup::new(
            name,
            ServerGroupSpec {
                name: waldur_name.map(str::to_string),
                ..Default::default()
            },
        );
        sg.metadata.namespace = Some("team-a".into());
        sg.metadata.uid = Some(uid.into());
        sg
    }

    /// The cache and the names index, fed one event as the watch feeds them.
    struct Fed {
        names: Names,
        cache: Store<ServerGroup>,
        writer: kube::runtime::reflector::store::Writer<ServerGroup>,
    }

    impl Fed {
        fn new() -> Self {
            let (cache, writer) = kube::runtime::reflector::store();
            Self {
                names: Names::default(),
                cache,
                writer,
            }
        }

        fn apply(&mut self, event: watcher::Event<ServerGroup>) {
            self.writer.apply_watcher_event(&event);
            self.names.apply(&event, &self.cache);
        }
    }

    fn names_of(names: &Names, name: &str) -> Vec<String> {
        let mut found: Vec<String> = names.named(name).into_iter().map(|r| r.name).collect();
        found.sort();
        found
    }

    #[test]
    fn resources_are_filed_under_the_name_their_group_has_in_waldur() {
        let mut fed = Fed::new();
        fed.apply(watcher::Event::Apply(sg("a", "u1", None)));
        fed.apply(watcher::Event::Apply(sg("b", "u2", Some("a"))));
        fed.apply(watcher::Event::Apply(sg("c", "u3", None)));
        assert_eq!(names_of(&fed.names, "a"), ["a", "b"]);
        // A name changed: moved, not listed twice.
        fed.apply(watcher::Event::Apply(sg("b", "u2", Some("c"))));
        assert_eq!(names_of(&fed.names, "a"), ["a"]);
        assert_eq!(names_of(&fed.names, "c"), ["b", "c"]);
        fed.apply(watcher::Event::Delete(sg("c", "u3", None)));
        assert_eq!(names_of(&fed.names, "c"), ["b"]);
        assert!(fed.names.named("nobody").is_empty());
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_the_watch_was_down() {
        let mut fed = Fed::new();
        fed.apply(watcher::Event::Apply(sg("a", "u1", None)));
        fed.apply(watcher::Event::Apply(sg("b", "u2", None)));
        fed.apply(watcher::Event::Init);
        fed.apply(watcher::Event::InitApply(sg("b", "u2", None)));
        // Until the relist is done, the old picture stands.
        assert_eq!(names_of(&fed.names, "a"), ["a"]);
        fed.apply(watcher::Event::InitDone);
        assert!(fed.names.named("a").is_empty());
        assert_eq!(names_of(&fed.names, "b"), ["b"]);
    }
}
