//! The tenant re-syncs (`pull_server_groups`) this process asks Waldur for, per Waldur and
//! tenant.
//!
//! A tenant re-sync holds the whole tenant (every tenant action, creates included, answers 409
//! until it ends), and one that fails in OpenStack leaves the tenant Erred for every user until
//! staff repair it (measured on Waldur 7.0.7). So the operator asks rarely: one in flight per
//! tenant, never sooner than the floor after the last one asked for (accepted or not), and only
//! after it saw the tenant OK. Whether one is due is decided in `plan::reimport_step`; this
//! table only remembers and serialises.
//!
//! An accepted re-sync is followed: the tenant is read once a second until the re-sync ends,
//! so that one that failed in OpenStack (the tenant Erred) is known as such even when staff
//! repair the tenant before the next reconcile looks (the campaign's R9 and seed 146: from the
//! tenant's state alone, a failed and repaired re-sync looks like one that ran).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::plan::{PullOutcome, PullResult, TenantPullsSeen, TenantSeen};
use crate::waldur::{WaldurClient, WaldurError, WaldurUuid};

#[derive(Default)]
pub struct TenantPulls {
    map: Mutex<HashMap<(String, WaldurUuid), Record>>,
    /// Nova groups this process let go of, per tenant (Orphan, Unlink): (name, Nova id,
    /// when). A re-sync brings them back as nobody's, under their old name. Tenant UUIDs are
    /// Waldur's, unique enough across Waldurs for this.
    released: Mutex<HashMap<WaldurUuid, Vec<Released>>>,
}

/// A Nova group let go of: its name, its Nova id, and when.
type Released = (String, String, std::time::Instant);

#[derive(Default)]
struct Record {
    seen: TenantPullsSeen,
    in_flight: bool,
}

/// How long a released group is remembered: longer than any wait for a re-import.
const RELEASED_KEPT: Duration = Duration::from_secs(24 * 3600);

/// How a request for a tenant re-sync went.
#[derive(Debug)]
pub enum Asked {
    /// Waldur accepted it (202) at this time.
    Accepted(Timestamp),
    /// Another reconcile of this process is asking right now; its answer serves this one too.
    InFlight,
    /// Waldur refused it (409: the tenant is not OK); the floor counts from this attempt.
    Refused(WaldurError),
}

impl TenantPulls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, WaldurUuid), Record>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What this process asked for in the tenant so far.
    pub fn seen(&self, waldur: &str, tenant: &WaldurUuid) -> TenantPullsSeen {
        self.lock()
            .get(&(waldur.to_string(), tenant.clone()))
            .map(|r| r.seen)
            .unwrap_or_default()
    }

    /// Remembers that a resource of this process let go of its group (Orphan, Unlink): the
    /// Nova group stays, and a re-sync brings it back under its name, nobody's. A resource
    /// looking for its own re-import by that name must not take it (the campaign's seeds 142
    /// and 154: one took it, and its Delete policy later deleted it).
    pub fn record_release(&self, tenant: &WaldurUuid, name: &str, backend_id: &str) {
        if backend_id.is_empty() {
            return;
        }
        let mut map = self.released.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let released = map.entry(tenant.clone()).or_default();
        released.retain(|(_, _, at)| now.duration_since(*at) < RELEASED_KEPT);
        released.push((name.to_string(), backend_id.to_string(), now));
    }

    /// Whether this process let go of the Nova group `backend_id` named `name` in the tenant.
    pub fn was_released(&self, tenant: &WaldurUuid, name: &str, backend_id: &str) -> bool {
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .is_some_and(|r| r.iter().any(|(n, b, _)| n == name && b == backend_id))
    }

    /// Asks Waldur to re-sync the tenant, unless another reconcile is asking already. Errors
    /// other than a 409 go up (the floor still counts from the attempt: no retry loop).
    pub async fn ask(
        self: &Arc<Self>,
        client: &WaldurClient,
        tenant: &WaldurUuid,
    ) -> Result<Asked, WaldurError> {
        let key = (client.base_url().to_string(), tenant.clone());
        {
            let mut map = self.lock();
            let record = map.entry(key.clone()).or_default();
            if record.in_flight {
                return Ok(Asked::InFlight);
            }
            record.in_flight = true;
            record.seen.last_asked = Some(Timestamp::now());
        }
        // Cleared whatever happens to this future (a reconcile aborted mid-request included).
        let _done = InFlight {
            pulls: self,
            key: &key,
        };
        match client.pull_tenant_server_groups(tenant).await {
            Ok(()) => {
                let at = Timestamp::now();
                if let Some(record) = self.lock().get_mut(&key) {
                    record.seen.last_accepted = Some(at);
                    record.seen.outcome = Some(PullOutcome {
                        accepted: at,
                        result: PullResult::Running,
                    });
                }
                tokio::spawn(self.clone().follow(client.clone(), key.clone(), at));
                Ok(Asked::Accepted(at))
            }
            Err(e) if e.kind() == crate::waldur::ErrorKind::Conflict => Ok(Asked::Refused(e)),
            Err(e) => Err(e),
        }
    }

    /// Reads the tenant once a second until the re-sync accepted at `accepted` ends, and
    /// records how: seen held, then OK, never Erred (it ran); Erred (it failed); or not
    /// observed closely enough to say (OK at the first read, reads failing for more than a few
    /// seconds, or longer than half an hour).
    async fn follow(
        self: Arc<Self>,
        client: WaldurClient,
        key: (String, WaldurUuid),
        accepted: Timestamp,
    ) {
        const EVERY: Duration = Duration::from_secs(1);
        const GAP: Duration = Duration::from_secs(4);
        const LONGEST: Duration = Duration::from_secs(1800);
        let started = tokio::time::Instant::now();
        let mut last_seen = started;
        // OK only counts after the re-sync was seen running: an OK at the first read may be a
        // re-sync that failed and was repaired before it.
        let mut saw_busy = false;
        let result = loop {
            tokio::time::sleep(EVERY).await;
            let now = tokio::time::Instant::now();
            if now.duration_since(started) > LONGEST {
                break PullResult::Unobserved;
            }
            let Ok(tenant) = client.get_tenant(&key.1).await else {
                continue;
            };
            let seen = TenantSeen::of(tenant.state.as_ref(), &tenant.error_message);
            if tokio::time::Instant::now().duration_since(last_seen) > GAP {
                // Too long unseen: an Erred-and-repaired spell may have been missed.
                break PullResult::Unobserved;
            }
            last_seen = tokio::time::Instant::now();
            match seen {
                TenantSeen::Ok if saw_busy => break PullResult::Ran,
                TenantSeen::Ok => break PullResult::Unobserved,
                TenantSeen::Erred(_) => break PullResult::Failed,
                TenantSeen::Busy(_) => saw_busy = true,
                TenantSeen::Invisible | TenantSeen::Unknown => break PullResult::Unobserved,
            }
        };
        let mut map = self.lock();
        if let Some(record) = map.get_mut(&key)
            && record.seen.outcome.is_some_and(|o| o.accepted == accepted)
        {
            record.seen.outcome = Some(PullOutcome { accepted, result });
        }
    }
}

struct InFlight<'a> {
    pulls: &'a TenantPulls,
    key: &'a (String, WaldurUuid),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(record) = self.pulls.lock().get_mut(self.key) {
            record.in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_asked_means_nothing_seen() {
        let pulls = TenantPulls::default();
        let tenant = WaldurUuid::parse("6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e").unwrap();
        assert_eq!(pulls.seen("https://w", &tenant), TenantPullsSeen::default());
    }

    #[tokio::test]
    async fn one_request_in_flight_per_tenant_and_the_attempt_is_remembered() {
        // A Waldur that never answers: the first ask hangs, the second is told InFlight.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = vec![];
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let settings = crate::waldur::ClientSettings::new(
            format!("http://{addr}"),
            crate::waldur::Token::new("t"),
        );
        let client = WaldurClient::new(&settings).unwrap();
        let pulls = std::sync::Arc::new(TenantPulls::default());
        let tenant = WaldurUuid::parse("6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e").unwrap();
        let first = {
            let (pulls, client, tenant) = (pulls.clone(), client.clone(), tenant.clone());
            tokio::spawn(async move { pulls.ask(&client, &tenant).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(matches!(
            pulls.ask(&client, &tenant).await,
            Ok(Asked::InFlight)
        ));
        assert!(pulls.seen(client.base_url(), &tenant).last_asked.is_some());
        assert!(
            pulls
                .seen(client.base_url(), &tenant)
                .last_accepted
                .is_none()
        );
        // The hung request is cancelled (a term ended): the tenant may be asked for again.
        first.abort();
        let _ = first.await;
        let again = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            pulls.ask(&client, &tenant),
        )
        .await;
        assert!(
            again.is_err(),
            "a new request was sent, not refused as in flight"
        );
    }
}
