//! Where messages come from. One source today: Kafka.

pub mod kafka;
pub mod subscription;
