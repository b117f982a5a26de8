//! Job ids that say where a job lives, signed so callers cannot forge them.
//!
//! Format: `j1.<payload>.<tag>`, both parts unpadded base64url. The payload is JSON naming the
//! replica that started the job, when, the caller's labels, the backend, and the backend's own
//! handle (for Daytona: sandbox, session and command ids). The tag is HMAC-SHA256 over
//! `j1.<payload>` with a key the replicas share, so any replica can verify an id and find a
//! job it did not start, while a caller cannot make one up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{DisconnectPolicy, JobId, JobMeta};

const VERSION: &str = "j1";

/// What a job id says about its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLocation {
    /// Replica that started the job (and holds its record).
    #[serde(rename = "r")]
    pub replica: String,
    /// Start time, milliseconds since the Unix epoch.
    #[serde(rename = "t")]
    pub started_ms: u64,
    /// Random, so ids of jobs started together differ.
    #[serde(rename = "n")]
    nonce: String,
    #[serde(rename = "b")]
    pub backend: String,
    #[serde(rename = "k", default, skip_serializing_if = "String::is_empty")]
    pub task_id: String,
    #[serde(rename = "s", default, skip_serializing_if = "String::is_empty")]
    pub session_id: String,
    #[serde(rename = "x", default, skip_serializing_if = "String::is_empty")]
    pub sandbox_id: String,
    /// The backend's handle of the job, when the job can be reached from any replica.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// The job's timeout in milliseconds (0: not said, as in ids issued before it was), so a
    /// replica that follows the job keeps its deadline when the one that started it is gone.
    #[serde(rename = "d", default, skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
    /// The job's disconnect policy (0: not said; 1 cancel, 2 detach, 3 cancel after
    /// `grace_ms`), so a replica that follows the job reports it.
    #[serde(rename = "p", default, skip_serializing_if = "is_zero_u8")]
    policy: u8,
    #[serde(rename = "g", default, skip_serializing_if = "is_zero")]
    grace_ms: u64,
}

fn is_zero_u8(n: &u8) -> bool {
    *n == 0
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl JobLocation {
    pub fn meta(&self) -> JobMeta {
        JobMeta {
            task_id: self.task_id.clone(),
            session_id: self.session_id.clone(),
            sandbox_id: self.sandbox_id.clone(),
        }
    }

    pub fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.started_ms)
    }

    /// The job's disconnect policy, when the id says it.
    pub fn on_disconnect(&self) -> Option<DisconnectPolicy> {
        match self.policy {
            1 => Some(DisconnectPolicy::Cancel),
            2 => Some(DisconnectPolicy::Detach),
            3 => Some(DisconnectPolicy::CancelAfter(Duration::from_millis(
                self.grace_ms,
            ))),
            _ => None,
        }
    }

    /// The job's timeout, when the id says it.
    pub fn timeout(&self) -> Option<Duration> {
        (self.timeout_ms > 0).then(|| Duration::from_millis(self.timeout_ms))
    }
}

/// Why a string is not a valid job id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobIdError {
    #[error("not a job id issued by this service")]
    Malformed,
    #[error("unsupported job id version")]
    Version,
    #[error("job id signature does not verify (forged, or signed with another key)")]
    Signature,
}

/// Issues and verifies job ids for one replica.
pub struct JobIdCodec {
    key: Vec<u8>,
    replica: String,
}

impl JobIdCodec {
    pub fn new(key: &[u8], replica: &str) -> Self {
        JobIdCodec {
            key: key.to_vec(),
            replica: replica.to_owned(),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// A new id for a job of `backend` started now, with `timeout` and `on_disconnect`.
    pub fn issue(
        &self,
        meta: &JobMeta,
        backend: &str,
        handle: Option<String>,
        (timeout, on_disconnect): (Duration, DisconnectPolicy),
    ) -> (JobId, JobLocation) {
        let millis = |d: Duration| d.as_millis().try_into().unwrap_or(u64::MAX);
        let (policy, grace_ms) = match on_disconnect {
            DisconnectPolicy::Cancel => (1, 0),
            DisconnectPolicy::Detach => (2, 0),
            DisconnectPolicy::CancelAfter(grace) => (3, millis(grace)),
        };
        let started_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let location = JobLocation {
            replica: self.replica.clone(),
            started_ms,
            nonce: format!("{:016x}", fastrand::u64(..)),
            backend: backend.to_owned(),
            task_id: meta.task_id.clone(),
            session_id: meta.session_id.clone(),
            sandbox_id: meta.sandbox_id.clone(),
            handle,
            timeout_ms: millis(timeout),
            policy,
            grace_ms,
        };
        let payload = B64.encode(serde_json::to_vec(&location).expect("location serialises"));
        let signed = format!("{VERSION}.{payload}");
        let tag = B64.encode(self.mac(&signed).finalize().into_bytes());
        (JobId::from_caller(format!("{signed}.{tag}")), location)
    }

    /// Verifies an id and returns what it says.
    pub fn verify(&self, id: &JobId) -> Result<JobLocation, JobIdError> {
        let (signed, tag) = id.as_str().rsplit_once('.').ok_or(JobIdError::Malformed)?;
        let (version, payload) = signed.split_once('.').ok_or(JobIdError::Malformed)?;
        if version != VERSION {
            return Err(if version.starts_with('j') {
                JobIdError::Version
            } else {
                JobIdError::Malformed
            });
        }
        let tag = B64.decode(tag).map_err(|_| JobIdError::Malformed)?;
        // Constant-time comparison (hmac's verify_slice).
        self.mac(signed)
            .verify_slice(&tag)
            .map_err(|_| JobIdError::Signature)?;
        let json = B64.decode(payload).map_err(|_| JobIdError::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| JobIdError::Malformed)
    }

    fn mac(&self, data: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(data.as_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> JobMeta {
        JobMeta {
            task_id: "task".into(),
            session_id: "sess".into(),
            sandbox_id: "sbx".into(),
        }
    }

    #[test]
    fn ids_round_trip_between_replicas_sharing_a_key() {
        let a = JobIdCodec::new(b"shared key", "replica-a");
        let b = JobIdCodec::new(b"shared key", "replica-b");
        let grace = DisconnectPolicy::CancelAfter(Duration::from_millis(2500));
        let (id, location) = a.issue(
            &meta(),
            "daytona",
            Some("handle".into()),
            (Duration::from_secs(60), grace),
        );
        assert_eq!(b.verify(&id).unwrap(), location);
        assert_eq!(location.timeout(), Some(Duration::from_secs(60)));
        assert_eq!(location.on_disconnect(), Some(grace));
        assert_eq!(location.replica, "replica-a");
        assert_eq!(location.meta(), meta());
        let (other, _) = a.issue(
            &meta(),
            "daytona",
            Some("handle".into()),
            (Duration::from_secs(60), DisconnectPolicy::Detach),
        );
        assert_ne!(id, other, "ids of jobs started together differ");
    }

    #[test]
    fn forged_and_mangled_ids_are_rejected() {
        let a = JobIdCodec::new(b"shared key", "replica-a");
        let (id, _) = a.issue(
            &meta(),
            "local",
            None,
            (Duration::from_secs(60), DisconnectPolicy::Cancel),
        );
        let stranger = JobIdCodec::new(b"another key", "replica-x");
        assert_eq!(stranger.verify(&id), Err(JobIdError::Signature));

        // Re-signing a changed payload needs the key; changing it alone breaks the tag.
        let (_, payload_and_tag) = id.as_str().split_once('.').unwrap();
        let (payload, tag) = payload_and_tag.split_once('.').unwrap();
        let mut location: serde_json::Value =
            serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
        location["r"] = "replica-evil".into();
        let forged = format!("j1.{}.{tag}", B64.encode(location.to_string()));
        assert_eq!(
            a.verify(&JobId::from_caller(forged)),
            Err(JobIdError::Signature)
        );

        for bad in [
            "",
            "nonsense",
            "j1.",
            "j1.a.b",
            "x1.abc.def",
            "6fe5e158-b0b5-4fcd-80ff-c16f8cd49734",
        ] {
            assert!(a.verify(&JobId::from_caller(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(
            a.verify(&JobId::from_caller("j9.abc.def")),
            Err(JobIdError::Version)
        );
    }
}
