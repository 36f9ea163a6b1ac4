//! Where messages go: Google Cloud Pub/Sub topics (which also fan a
//! message out to its objects) and Cloud Storage objects.

pub(crate) mod copies;
pub(crate) mod pubsub;
pub(crate) mod storage;
