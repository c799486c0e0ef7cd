//! The dead-letter queue: what goes into it, and (for operators) listing, replaying and
//! purging it.
//!
//! A dead letter is the original message body with its original properties, plus headers
//! saying which event, which workflow, which user, how many provider calls, the last error and
//! when. One message per failed workflow run, so a replay re-runs exactly that workflow.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::core::event::Event;
use crate::core::failure::Failure;
use crate::transport::headers::{self, set_int, set_str, set_strings};
use crate::transport::publisher::{PublishError, Publisher};
use crate::transport::topology::Topology;

/// Why something is dead-lettered: a stable code for filters and metrics, and one line of
/// text for people.
#[derive(Debug, Clone)]
pub struct Reason {
    pub code: ReasonCode,
    pub text: String,
}

/// The `x-appevents-reason-code` of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonCode {
    /// Not a valid event.
    Invalid,
    /// Delivered, or its run taken over, too many times without being finished.
    Poison,
    /// A permanent error: trying again cannot help.
    Permanent,
    /// Every scheduled retry was used.
    Exhausted,
    /// The payload does not match its app event's example, under a payload check of `reject`.
    PayloadMismatch,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Invalid => "invalid",
            ReasonCode::Poison => "poison",
            ReasonCode::Permanent => "permanent",
            ReasonCode::Exhausted => "exhausted",
            ReasonCode::PayloadMismatch => "payload_mismatch",
        }
    }
}

/// What a dead letter says about itself.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub reason: Reason,
    pub event: Option<&'a Event>,
    pub workflow_id: Option<Uuid>,
    /// Provider calls made for the run, over every delivery.
    pub provider_calls: Option<u32>,
    pub failure: Option<&'a Failure>,
}

/// Headers added on top of the original properties; appevents' own routing headers
/// (retries done, workflows, replay) and the broker's bookkeeping are dropped.
pub fn properties(original: &BasicProperties, letter: &DeadLetter<'_>) -> BasicProperties {
    let mut headers = carried_headers(original.headers().as_ref());
    set_str(&mut headers, headers::REASON, &letter.reason.text);
    set_str(
        &mut headers,
        headers::REASON_CODE,
        letter.reason.code.as_str(),
    );
    set_str(&mut headers, headers::DEAD_LETTERED_AT, &now_rfc3339());
    if let Some(event) = letter.event {
        set_str(&mut headers, headers::EVENT_ID, &event.id);
        set_str(&mut headers, headers::EVENT_NAME, &event.name);
        set_str(&mut headers, headers::USER_ID, &event.user_id);
    }
    if let Some(workflow_id) = letter.workflow_id {
        let id = workflow_id.to_string();
        set_str(&mut headers, headers::WORKFLOW_ID, &id);
        // A replay runs exactly this workflow.
        set_strings(&mut headers, headers::WORKFLOWS, &[id]);
    }
    if let Some(calls) = letter.provider_calls {
        set_int(&mut headers, headers::PROVIDER_CALLS, i64::from(calls));
    }
    if let Some(failure) = letter.failure {
        set_str(&mut headers, headers::ERROR_KIND, failure.kind.as_str());
        if let Some(status) = failure.status {
            set_int(&mut headers, headers::ERROR_STATUS, i64::from(status));
        }
        if let Some(code) = &failure.code {
            set_str(&mut headers, headers::ERROR_CODE, code);
        }
        set_str(&mut headers, headers::ERROR_MESSAGE, &failure.message);
    }
    let mut properties = original.clone().with_headers(headers);
    if let Some(event) = letter.event {
        properties = properties.with_message_id(event.id.as_str().into());
    }
    // Persistent, whatever the producer sent.
    properties.with_delivery_mode(2)
}

/// The original headers without appevents' routing headers and the broker's bookkeeping.
pub fn carried_headers(original: Option<&FieldTable>) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(original) = original {
        for (key, value) in original.inner() {
            let key_str = key.as_str();
            let dropped = key_str.starts_with("x-appevents-")
                || key_str.starts_with("x-death")
                || key_str.starts_with("x-first-death")
                || key_str.starts_with("x-last-death")
                || key_str == headers::DELIVERY_COUNT;
            if !dropped {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Which dead letters an operation applies to; every filter given must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub event_id: Option<String>,
    pub event_name: Option<String>,
    pub user_id: Option<String>,
    pub workflow_id: Option<Uuid>,
    /// Case-insensitive substring of the reason.
    pub reason: Option<String>,
    /// Dead-lettered at least this long ago.
    pub older_than: Option<std::time::Duration>,
    /// Dead-lettered at most this long ago.
    pub newer_than: Option<std::time::Duration>,
}

/// One dead letter as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Letter {
    /// Position in the queue, from 1.
    pub position: usize,
    pub reason: String,
    pub reason_code: String,
    pub event_id: Option<String>,
    pub event_name: Option<String>,
    pub user_id: Option<String>,
    pub workflow_id: Option<String>,
    /// Provider calls made for the run, over every delivery (`attempts` in JSON, as the
    /// header it comes from).
    #[serde(rename = "attempts")]
    pub provider_calls: Option<i64>,
    pub error_kind: Option<String>,
    pub error_status: Option<i64>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub dead_lettered_at: Option<OffsetDateTime>,
    /// The original body, as text when it is UTF-8.
    pub body: String,
    pub body_bytes: usize,
}

/// The `name` of a body that is a JSON object with a non-empty string there.
fn name_in_body(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let name = value.get("name")?.as_str()?;
    (!name.trim().is_empty()).then(|| name.to_owned())
}

impl Letter {
    pub fn from_message(position: usize, body: &[u8], properties: &BasicProperties) -> Letter {
        let headers = properties.headers().as_ref();
        let text = |key| headers::read_str(headers, key);
        let (reason, reason_code) = match (text(headers::REASON), text(headers::REASON_CODE)) {
            (Some(reason), code) => (reason, code.unwrap_or_else(|| "unknown".to_owned())),
            // Dead-lettered by the broker itself (the work queue's delivery limit).
            _ => match broker_death(headers) {
                Some((why, _)) => (
                    format!(
                        "dead-lettered by the broker: {why} (delivered too many times without an acknowledgement)"
                    ),
                    ReasonCode::Poison.as_str().to_owned(),
                ),
                None => ("no reason recorded".to_owned(), "unknown".to_owned()),
            },
        };
        let dead_lettered_at = text(headers::DEAD_LETTERED_AT)
            .and_then(|at| OffsetDateTime::parse(&at, &Rfc3339).ok())
            .or_else(|| broker_death(headers).and_then(|(_, at)| at));
        Letter {
            position,
            reason,
            reason_code,
            event_id: text(headers::EVENT_ID).or_else(|| {
                properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
            }),
            // An invalid message has no event headers; its body may still name the event.
            event_name: text(headers::EVENT_NAME).or_else(|| name_in_body(body)),
            user_id: text(headers::USER_ID),
            workflow_id: text(headers::WORKFLOW_ID),
            provider_calls: headers::read_int(headers, headers::PROVIDER_CALLS),
            error_kind: text(headers::ERROR_KIND),
            error_status: headers::read_int(headers, headers::ERROR_STATUS),
            error_code: text(headers::ERROR_CODE),
            error_message: text(headers::ERROR_MESSAGE),
            dead_lettered_at,
            body: String::from_utf8_lossy(body).into_owned(),
            body_bytes: body.len(),
        }
    }

    pub fn matches(&self, filter: &Filter, now: OffsetDateTime) -> bool {
        let same = |wanted: &Option<String>, actual: &Option<String>| {
            wanted
                .as_ref()
                .is_none_or(|w| actual.as_deref() == Some(w.as_str()))
        };
        let workflow = filter.workflow_id.map(|id| id.to_string());
        let reason_ok = filter
            .reason
            .as_ref()
            .is_none_or(|needle| self.reason.to_lowercase().contains(&needle.to_lowercase()));
        let age = self.dead_lettered_at.map(|at| now - at);
        let older_ok = filter.older_than.is_none_or(|limit| {
            age.is_some_and(|age| {
                age >= time::Duration::try_from(limit).unwrap_or(time::Duration::MAX)
            })
        });
        let newer_ok = filter.newer_than.is_none_or(|limit| {
            age.is_some_and(|age| {
                age <= time::Duration::try_from(limit).unwrap_or(time::Duration::MAX)
            })
        });
        same(&filter.event_id, &self.event_id)
            && same(&filter.event_name, &self.event_name)
            && same(&filter.user_id, &self.user_id)
            && same(&workflow, &self.workflow_id)
            && reason_ok
            && older_ok
            && newer_ok
    }
}

/// The reason and time of the broker's own dead-lettering, from `x-death`.
fn broker_death(headers: Option<&FieldTable>) -> Option<(String, Option<OffsetDateTime>)> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let reason = match first.inner().get("reason")? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        _ => return None,
    };
    let at = match first.inner().get("time") {
        Some(AMQPValue::Timestamp(secs)) => {
            OffsetDateTime::from_unix_timestamp(i64::try_from(*secs).ok()?).ok()
        }
        _ => None,
    };
    Some((reason, at))
}

/// What an operation on the dead-letter queue did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Messages looked at.
    pub scanned: usize,
    /// Messages that matched the filter (and were moved or deleted, unless a dry run).
    pub matched: usize,
    pub moved: usize,
    pub purged: usize,
    /// Matching messages by reason code.
    pub by_reason: std::collections::BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look only.
    List,
    /// Move matching messages back to the work queue.
    Replay,
    /// Delete matching messages.
    Purge,
}

/// Walks the dead-letter queue once, front to back, taking each message without
/// acknowledging it. Matching messages are (for `Replay`) republished to the work queue and,
/// once the broker confirmed that, acknowledged; (for `Purge`) acknowledged. Everything else
/// is handed back when the channel closes and stays in place and in order. Killing the
/// process at any point loses nothing: at worst a message was republished but not yet
/// acknowledged, and is replayed twice, which the run records absorb.
pub async fn walk(
    connection: &lapin::Connection,
    topology: &Topology,
    filter: &Filter,
    action: Action,
    mut visit: impl FnMut(&Letter),
) -> Result<Report, PublishError> {
    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};

    let channel = connection.create_channel().await?;
    let publisher = Publisher::open(connection).await?;
    let queue = channel
        .queue_declare(
            topology.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let now = OffsetDateTime::now_utc();
    let mut report = Report::default();
    // Only what is there now: letters added meanwhile wait for the next walk.
    for position in 1..=queue.message_count() as usize {
        let Some(message) = channel
            .basic_get(
                topology.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        report.scanned += 1;
        let delivery = &message.delivery;
        let letter = Letter::from_message(position, &delivery.data, &delivery.properties);
        if !letter.matches(filter, now) {
            continue;
        }
        report.matched += 1;
        *report
            .by_reason
            .entry(letter.reason_code.clone())
            .or_default() += 1;
        visit(&letter);
        match action {
            Action::List => {}
            Action::Replay => {
                let properties = replay_properties(&delivery.properties);
                publisher
                    .publish("", &topology.queue, &delivery.data, properties)
                    .await?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
                report.moved += 1;
            }
            Action::Purge => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
                report.purged += 1;
            }
        }
    }
    // Hands back every message not acknowledged, in its place.
    let _ = channel.close(200, "dead-letter walk done".into()).await;
    let _ = publisher
        .channel()
        .close(200, "dead-letter walk done".into())
        .await;
    Ok(report)
}

/// A replayed message: the original body and properties, a fresh attempt budget, only the
/// workflow that failed (when the letter names one), and the replay mark that lets a dead
/// run run again.
fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let headers = original.headers().as_ref();
    let workflow = headers::read_str(headers, headers::WORKFLOW_ID);
    let mut replayed = carried_headers(headers);
    headers::set_bool(&mut replayed, headers::REPLAY, true);
    if let Some(workflow) = workflow {
        set_strings(&mut replayed, headers::WORKFLOWS, &[workflow]);
    }
    original.clone().with_headers(replayed)
}
