//! From Kafka Connect: the files an operator already has (a worker file, a
//! CloudPubSubSinkConnector file, a console consumer's `consumer.properties`
//! and JAAS file) read as Java reads them and turned into ztfhook's
//! settings, with a note for each one that cannot be carried over.

pub mod client;
pub mod import;
pub mod jaas;
pub mod properties;
