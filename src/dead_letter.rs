//! The dead-letter queue: what goes into it, and (for operators) listing, replaying and
//! purging it.
//!
//! A dead letter is the original message body with its original properties, plus headers
//! saying which event, which workflow, which user, how many attempts, the last error and
//! when. One message per failed workflow run, so a replay re-runs exactly that workflow.

use lapin::BasicProperties;
use lapin::types::FieldTable;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::broker::{header, set_int, set_str, set_strings};
use crate::classify::Failure;
use crate::envelope::Event;

/// Why something is dead-lettered; `code` is a stable label for filters and metrics.
#[derive(Debug, Clone)]
pub struct Reason {
    pub code: &'static str,
    pub text: String,
}

pub const INVALID: &str = "invalid";
pub const POISON: &str = "poison";
pub const PERMANENT: &str = "permanent";
pub const EXHAUSTED: &str = "exhausted";

/// What a dead letter says about itself.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub reason: Reason,
    pub event: Option<&'a Event>,
    pub workflow_id: Option<Uuid>,
    /// Provider calls made over every delivery.
    pub attempts: Option<u32>,
    pub failure: Option<&'a Failure>,
}

/// Headers added on top of the original properties; appevents' own routing headers
/// (attempt, workflows, replay) and the broker's bookkeeping are dropped.
pub fn properties(original: &BasicProperties, letter: &DeadLetter<'_>) -> BasicProperties {
    let mut headers = carried_headers(original.headers().as_ref());
    set_str(&mut headers, header::REASON, &letter.reason.text);
    set_str(&mut headers, header::REASON_CODE, letter.reason.code);
    set_str(&mut headers, header::DEAD_LETTERED_AT, &now_rfc3339());
    if let Some(event) = letter.event {
        set_str(&mut headers, header::EVENT_ID, &event.id);
        set_str(&mut headers, header::EVENT_NAME, &event.name);
        set_str(&mut headers, header::USER_ID, &event.user_id);
    }
    if let Some(workflow_id) = letter.workflow_id {
        let id = workflow_id.to_string();
        set_str(&mut headers, header::WORKFLOW_ID, &id);
        // A replay runs exactly this workflow.
        set_strings(&mut headers, header::WORKFLOWS, &[id]);
    }
    if let Some(attempts) = letter.attempts {
        set_int(&mut headers, header::ATTEMPTS, i64::from(attempts));
    }
    if let Some(failure) = letter.failure {
        set_str(&mut headers, header::ERROR_KIND, failure.kind.as_str());
        if let Some(status) = failure.status {
            set_int(&mut headers, header::ERROR_STATUS, i64::from(status));
        }
        if let Some(code) = &failure.code {
            set_str(&mut headers, header::ERROR_CODE, code);
        }
        set_str(&mut headers, header::ERROR_MESSAGE, &failure.message);
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
                || key_str == header::DELIVERY_COUNT;
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
