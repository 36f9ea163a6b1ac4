//! Where messages go. One sink today: Google Cloud Pub/Sub.

pub mod pubsub;
