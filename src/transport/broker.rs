//! RabbitMQ connections: how every process reaches the broker, and whether the connection
//! recovers by itself.
//!
//! `amqp.url` names one node or several (the nodes of a cluster, comma-separated). A
//! connection goes to the first node that answers, trying them in order; when it is lost, a
//! new one is made the same way, so a stopped node's clients move to the next node.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

use crate::config::amqp_nodes;
use crate::observe::errors::report;

/// Whether a connection reconnects by itself. Long-running processes recover; one-shot
/// commands fail fast with a clear message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    Automatic,
    None,
}

/// How long one node may take to accept a connection before the next one is tried.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the first node of `url` that accepts. With a single node, `Automatic`
/// recovery redials that node in place; with several, the connection does not recover by
/// itself: its owner makes a new one, which goes to whichever node answers.
pub async fn connect(
    url: &str,
    tls_ca_file: &str,
    name: &str,
    recovery: Recovery,
) -> Result<Connection, lapin::Error> {
    let nodes = amqp_nodes(url).map_err(invalid)?;
    let recovery = if nodes.len() > 1 {
        Recovery::None
    } else {
        recovery
    };
    let mut last_error = None;
    for (index, node) in nodes.iter().enumerate() {
        match tokio::time::timeout(
            NODE_CONNECT_TIMEOUT,
            connect_node(node, tls_ca_file, name, recovery),
        )
        .await
        {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(err)) => {
                if nodes.len() > 1 {
                    tracing::warn!(node = index + 1, error = %report(&err), "broker node unreachable; trying the next");
                }
                last_error = Some(err);
            }
            Err(_) => {
                tracing::warn!(node = index + 1, timeout = ?NODE_CONNECT_TIMEOUT, "broker node did not answer; trying the next");
                last_error = Some(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {NODE_CONNECT_TIMEOUT:?}"),
                )));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| invalid("amqp.url names no node".to_owned())))
}

fn invalid(message: String) -> lapin::Error {
    lapin::Error::from(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        message,
    ))
}

async fn connect_node(
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

/// Why a connection to the broker at `url` failed, in one line: the address (without its
/// password) and the cause once, in the terms an operator acts on (a missing virtual host, a
/// refused login, a closed port) rather than the protocol's.
pub fn connect_failure(url: &str, err: &lapin::Error) -> String {
    format!(
        "cannot connect to the broker at {}: {}",
        redacted(url),
        cause(url, err)
    )
}

fn cause(url: &str, err: &lapin::Error) -> String {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let message = amqp.get_message().as_str();
            // The broker's text is "CODE - explanation".
            let explanation = message.split_once(" - ").map_or(message, |(_, text)| text);
            if explanation.starts_with("vhost ") && explanation.ends_with(" not found") {
                return format!(
                    "virtual host {:?} does not exist (create it, or fix the URL's path)",
                    vhost(url)
                );
            }
            if explanation.starts_with("no exchange ") {
                return format!(
                    "{explanation}: `appevents migrate` or a starting worker declares it \
                     (is the virtual host right?)"
                );
            }
            if message.starts_with("ACCESS_REFUSED") && explanation.starts_with("Login was refused")
            {
                return "login refused: wrong user name or password".to_owned();
            }
            explanation.to_owned()
        }
        lapin::ErrorKind::IOError(io) => io.to_string(),
        _ => report(err),
    }
}

/// The URL without its password; each node's, when it names several.
fn redacted(url: &str) -> String {
    let Ok(nodes) = amqp_nodes(url) else {
        return "the configured URL".to_owned();
    };
    let nodes: Vec<String> = nodes
        .into_iter()
        .map(|node| match reqwest::Url::parse(node) {
            Ok(mut parsed) => {
                let _ = parsed.set_password(None);
                parsed.to_string()
            }
            Err(_) => "the configured URL".to_owned(),
        })
        .collect();
    nodes.join(",")
}

/// The virtual host a URL names: its path, percent-decoded (`/` when empty). The nodes of a
/// cluster share their virtual hosts, so the first node's is every node's.
fn vhost(url: &str) -> String {
    let first = amqp_nodes(url)
        .ok()
        .and_then(|nodes| nodes.first().copied())
        .unwrap_or(url);
    let path = reqwest::Url::parse(first)
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .unwrap_or_default();
    let decoded = percent_encoding::percent_decode_str(&path)
        .decode_utf8_lossy()
        .into_owned();
    if decoded.is_empty() {
        "/".to_owned()
    } else {
        decoded
    }
}

/// A one-shot connection for an operator's action on the queues (the `dlq` and `runs retry`
/// commands, the console): no recovery, so an action fails rather than waits; and the
/// topology the workers use. The error is one line naming the broker, its password hidden.
pub async fn operator_session(
    settings: &crate::config::Settings,
    name: &str,
) -> Result<(Connection, crate::transport::topology::Topology), String> {
    let connection = connect(
        settings.amqp_url(),
        &settings.amqp.tls_ca_file,
        name,
        Recovery::None,
    )
    .await
    .map_err(|err| connect_failure(settings.amqp_url(), &err))?;
    let topology =
        crate::transport::topology::Topology::new(&settings.amqp, &settings.retry.schedule);
    Ok((connection, topology))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_address_without_its_password() {
        let err = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let line = connect_failure("amqp://guest:secret@127.0.0.1:1/%2f", &err);
        assert!(
            line.starts_with("cannot connect to the broker at amqp://guest@127.0.0.1:1/%2f: "),
            "{line}"
        );
        assert!(!line.contains("secret"), "{line}");
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost("amqp://h:5672/team%2Fa"), "team/a");
        let cluster = connect_failure("amqp://u:p1@a:5672/v,amqp://u:p2@b:5672/v", &err);
        assert!(
            cluster.starts_with(
                "cannot connect to the broker at amqp://u@a:5672/v,amqp://u@b:5672/v: "
            ),
            "{cluster}"
        );
        assert_eq!(vhost("amqp://a:5672/team,amqp://b:5672/team"), "team");
    }
}
