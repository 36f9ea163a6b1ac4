//! Writing alerts to Cloud Storage objects with Google's official
//! `google-cloud-storage` crate.
//!
//! Invariants:
//! - every write is create-only (`ifGenerationMatch=0`): an object that is
//!   there already with the same bytes counts as written, so the
//!   redeliveries of at-least-once (a restart, a rebalance, a replay) leave
//!   the first copy untouched and cost a refused request and a read each;
//!   one there with other bytes (a name not unique to one message) is
//!   refused, left as it is, and the message takes the dead-letter topic;
//! - the payload is written untouched (shared, not copied), with the
//!   message's attributes as the object's custom metadata and its CRC32C,
//!   which Cloud Storage checks before it keeps the object;
//! - transient errors (timeouts, 429, 5xx, a lost connection) are retried
//!   with backoff without limit, as for Pub/Sub (401 too: a token that
//!   expired in flight): an object is never skipped because Cloud Storage
//!   was unavailable; a refused object (400) goes to the dead-letter topic,
//!   as a message Pub/Sub refuses does; a missing bucket or a permission
//!   error (403) is permanent and stops the bridge, uncommitted (a missing bucket after a
//!   minute of retries);
//! - at most `storage.max_concurrent_writes` writes are in flight; the
//!   pipeline's in-flight limits bound what waits for them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_storage::client::Storage;

use crate::metrics::Metrics;
use crate::objects::ObjectName;
use crate::sink::pubsub::SinkError;

/// How long the crate retries a transient error itself before ztfhook's own
/// loop logs it and tries again.
const CRATE_RETRY_LIMIT: Duration = Duration::from_secs(10);
const RETRY_INITIAL: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a bucket may be missing before that is fatal (as for a Pub/Sub
/// topic): long enough for an emulator restart or a bucket being made,
/// short enough that a typo stops the bridge in a minute.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(60);

/// Where Cloud Storage is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageEndpoint {
    /// `STORAGE_EMULATOR_HOST` (fake-gcs-server and the like): anonymous.
    Emulator(String),
    /// Google's API (or `storage.endpoint`), Application Default Credentials.
    Google(Option<String>),
}

impl StorageEndpoint {
    /// `STORAGE_EMULATOR_HOST` if set, else the configured endpoint.
    pub fn resolve(configured: Option<&str>) -> StorageEndpoint {
        match std::env::var("STORAGE_EMULATOR_HOST") {
            Ok(host) if !host.trim().is_empty() => {
                let host = host.trim().trim_end_matches('/');
                StorageEndpoint::Emulator(if host.contains("://") {
                    host.to_string()
                } else {
                    format!("http://{host}")
                })
            }
            _ => StorageEndpoint::Google(configured.map(str::to_string)),
        }
    }
}

impl std::fmt::Display for StorageEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageEndpoint::Emulator(url) => write!(f, "the Cloud Storage emulator at {url}"),
            StorageEndpoint::Google(Some(url)) => write!(f, "Cloud Storage at {url}"),
            StorageEndpoint::Google(None) => f.write_str("Cloud Storage"),
        }
    }
}

/// How one object write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Created by this write.
    Created,
    /// It was there already (a redelivery): counts as written.
    Existed,
    /// Cloud Storage refused this object (its name, its size): the error
    /// policy.
    Refused(String),
    /// A permanent error (no such bucket, permission denied): the bridge
    /// stops.
    Failed(String),
}

/// The Cloud Storage client and the bound on writes in flight.
pub struct ObjectSink {
    client: Storage,
    slots: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
    endpoint: StorageEndpoint,
}

impl ObjectSink {
    /// Builds the client (no request is made until the first write).
    ///
    /// # Errors
    /// [`SinkError::Client`] if it cannot be built (no credentials, say).
    pub async fn connect(
        storage: &crate::config::Storage,
        metrics: Arc<Metrics>,
    ) -> Result<ObjectSink, SinkError> {
        let endpoint = StorageEndpoint::resolve(storage.endpoint.as_deref());
        let mut builder = Storage::builder().with_retry_policy(
            google_cloud_storage::retry_policy::RetryableErrors.with_time_limit(CRATE_RETRY_LIMIT),
        );
        match &endpoint {
            StorageEndpoint::Emulator(url) => {
                builder = builder.with_endpoint(url.clone()).with_credentials(
                    google_cloud_auth::credentials::anonymous::Builder::new().build(),
                );
            }
            StorageEndpoint::Google(Some(url)) => builder = builder.with_endpoint(url.clone()),
            StorageEndpoint::Google(None) => {}
        }
        let client = builder.build().await.map_err(|e| SinkError::Client {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
        tracing::info!("writing objects to {endpoint}");
        Ok(ObjectSink {
            client,
            slots: tokio::sync::Semaphore::new(storage.max_concurrent_writes),
            metrics,
            endpoint,
        })
    }

    /// Writes `payload` to `object` unless it exists, retrying transient
    /// errors until it is written, refused, or fails permanently.
    pub async fn write(
        &self,
        object: &ObjectName,
        payload: Bytes,
        metadata: &HashMap<String, String>,
    ) -> Written {
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let bucket = format!("projects/_/buckets/{}", object.bucket);
        let mut delay = RETRY_INITIAL;
        let mut attempt: u64 = 0;
        let mut missing_since: Option<std::time::Instant> = None;
        let started = std::time::Instant::now();
        // Sent ahead in the request's metadata, so Cloud Storage checks the
        // bytes it stores (and the request has no trailing checksum part,
        // which emulators store as data).
        let crc = crc32c::crc32c(&payload);
        loop {
            let result = self
                .client
                .write_object(&bucket, &object.name, payload.clone())
                .with_known_crc32c(crc)
                .set_if_generation_match(0)
                .set_metadata(metadata.iter().map(|(k, v)| (k.clone(), v.clone())))
                .send_unbuffered()
                .await;
            let error = match result {
                Ok(_) => {
                    self.metrics
                        .object_written(payload.len(), started.elapsed(), false);
                    return Written::Created;
                }
                Err(e) => e,
            };
            match error.http_status_code() {
                Some(412) => match self.same_content(&bucket, object, &payload).await {
                    Ok(true) => {
                        self.metrics.object_written(payload.len(), started.elapsed(), true);
                        return Written::Existed;
                    }
                    Ok(false) => {
                        return Written::Refused(format!(
                            "object `{object}` exists with other content (is its name unique to one message?); it was left as it is"
                        ))
                    }
                    Err(e) => {
                        self.metrics.object_failed();
                        tracing::warn!(
                            "object `{object}` exists; reading it back to compare failed, retrying in {delay:?}: {e}"
                        );
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(RETRY_MAX);
                    }
                },
                Some(400 | 413) => {
                    return Written::Refused(format!(
                        "{} refused object `{object}`: {error}",
                        self.endpoint
                    ))
                }
                Some(404)
                    if missing_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                        < NOT_FOUND_GRACE =>
                {
                    self.metrics.object_failed();
                    attempt += 1;
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(
                            "object `{object}`: bucket `{}` not found (attempt {attempt}); retrying for up to {NOT_FOUND_GRACE:?} in case it is being made",
                            object.bucket
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Some(404) => {
                    return Written::Failed(format!(
                        "bucket `{}` not found at {} (create it, or fix the name): {error}",
                        object.bucket, self.endpoint
                    ))
                }
                Some(403) => {
                    return Written::Failed(format!(
                        "writing `{object}` is not allowed (the service account needs storage.objects.create on the bucket): {error}"
                    ))
                }
                _ => {
                    self.metrics.object_failed();
                    attempt += 1;
                    self.metrics
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(
                            "object `{object}`: write failed (attempt {attempt}), retrying in {delay:?}: {error}"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Whether the object already at `object` holds `payload` (a
    /// redelivery) and not another message's bytes (a name that is not
    /// unique). Read back whole: a redelivery is rare, and an alert small.
    async fn same_content(
        &self,
        bucket: &str,
        object: &ObjectName,
        payload: &Bytes,
    ) -> Result<bool, google_cloud_storage::Error> {
        let mut read = self.client.read_object(bucket, &object.name).send().await?;
        let mut stored = Vec::with_capacity(payload.len());
        while let Some(chunk) = read.next().await.transpose()? {
            if stored.len() + chunk.len() > payload.len() {
                return Ok(false);
            }
            stored.extend_from_slice(&chunk);
        }
        Ok(stored == payload[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emulator_host_gets_a_scheme_when_it_has_none() {
        // Only this test reads or sets the variable.
        std::env::set_var("STORAGE_EMULATOR_HOST", "127.0.0.1:4443");
        assert_eq!(
            StorageEndpoint::resolve(Some("https://private.googleapis.com")),
            StorageEndpoint::Emulator("http://127.0.0.1:4443".into())
        );
        std::env::set_var("STORAGE_EMULATOR_HOST", "");
        assert_eq!(
            StorageEndpoint::resolve(Some("https://private.googleapis.com")),
            StorageEndpoint::Google(Some("https://private.googleapis.com".into()))
        );
        std::env::remove_var("STORAGE_EMULATOR_HOST");
    }
}
