//! RabbitMQ connections: how every process reaches the broker, and whether the connection
//! recovers by itself.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

/// Whether a connection reconnects by itself. Long-running processes recover; one-shot
/// commands fail fast with a clear message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    Automatic,
    None,
}

pub async fn connect(
    url: &str,
    tls_ca_file: &str,
    name: &str,
    recovery: Recovery,
) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let properties = match recovery {
        // lapin redials with this backoff and replays exchanges, queues, bindings, qos and
        // consumers; forever, because a worker should outlive any broker outage.
        Recovery::Automatic => properties
            .enable_auto_recover()
            .configure_backoff(|backoff| {
                backoff
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(usize::MAX)
                    .with_jitter()
            }),
        Recovery::None => properties,
    };
    // For amqps://, the broker's certificate is verified against the platform's trust store
    // plus these extra roots; a plain amqp:// URL ignores them.
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: if tls_ca_file.is_empty() {
            None
        } else {
            let pem = std::fs::read_to_string(tls_ca_file).map_err(|err| {
                std::io::Error::new(err.kind(), format!("amqp.tls_ca_file {tls_ca_file}: {err}"))
            })?;
            Some(pem)
        },
    };
    Connection::connect_with_config(url, properties, tls, lapin::runtime::default_runtime()?).await
}
