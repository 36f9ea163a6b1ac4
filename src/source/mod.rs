//! Where messages come from. One source today: Kafka.

pub(crate) mod consumer;
pub mod kafka;
pub mod subscription;
