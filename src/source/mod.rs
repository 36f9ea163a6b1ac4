//! Where messages come from. One source today: Kafka.

pub(crate) mod consumer;
pub(crate) mod kafka;
pub mod subscription;
