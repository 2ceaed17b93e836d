//! The tenant re-syncs (`pull_server_groups`) this process asks Waldur for, per Waldur and
//! tenant.
//!
//! A tenant re-sync holds the whole tenant (every tenant action, creates included, answers 409
//! until it ends), and one that fails in OpenStack leaves the tenant Erred for every user until
//! staff repair it (measured on Waldur 7.0.7). So the operator asks rarely: one in flight per
//! tenant, never sooner than the floor after the last one asked for (accepted or not), and only
//! after it saw the tenant OK. Whether one is due is decided in `plan::reimport_step`; this
//! table only remembers and serialises.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;

use super::plan::TenantPullsSeen;
use crate::waldur::{WaldurClient, WaldurError, WaldurUuid};

#[derive(Default)]
pub struct TenantPulls {
    map: Mutex<HashMap<(String, WaldurUuid), Record>>,
}

#[derive(Default)]
struct Record {
    seen: TenantPullsSeen,
    in_flight: bool,
}

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

    /// Asks Waldur to re-sync the tenant, unless another reconcile is asking already. Errors
    /// other than a 409 go up (the floor still counts from the attempt: no retry loop).
    pub async fn ask(
        &self,
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
                }
                Ok(Asked::Accepted(at))
            }
            Err(e) if e.kind() == crate::waldur::ErrorKind::Conflict => Ok(Asked::Refused(e)),
            Err(e) => Err(e),
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
