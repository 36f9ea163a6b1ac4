//! Where messages go. One sink today: Google Cloud Pub/Sub.

pub(crate) mod pubsub;
