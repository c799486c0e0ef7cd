//! The headers appevents adds to the messages it republishes (retries, dead letters,
//! replays), and typed reads and writes of header values, tolerant of the many integer
//! types clients use.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// Broker-level retries done so far (0 or absent on a first delivery). The wire name is
/// older than the distinction: messages already queued carry it, so it stays.
pub const RETRIES_DONE: &str = "x-appevents-attempt";
/// Only these workflows (ids) run for this message: a retry or a replay.
pub const WORKFLOWS: &str = "x-appevents-workflows";
/// Set on replays from the dead-letter queue: dead runs may run again.
pub const REPLAY: &str = "x-appevents-replay";
/// Set by quorum queues on redelivery.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

pub const REASON: &str = "x-appevents-reason";
pub const REASON_CODE: &str = "x-appevents-reason-code";
pub const EVENT_ID: &str = "x-appevents-event-id";
pub const EVENT_NAME: &str = "x-appevents-event-name";
pub const USER_ID: &str = "x-appevents-user-id";
pub const WORKFLOW_ID: &str = "x-appevents-workflow-id";
/// Provider calls made for the run, over every delivery (part of the documented dead-letter
/// headers, hence its name).
pub const PROVIDER_CALLS: &str = "x-appevents-attempts";
pub const ERROR_KIND: &str = "x-appevents-error-kind";
pub const ERROR_STATUS: &str = "x-appevents-error-status";
pub const ERROR_CODE: &str = "x-appevents-error-code";
pub const ERROR_MESSAGE: &str = "x-appevents-error-message";
pub const DEAD_LETTERED_AT: &str = "x-appevents-dead-lettered-at";
pub const RETRY_AT: &str = "x-appevents-retry-at";

/// A string header's text.
pub fn read_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header's value, whatever its width (or a string or timestamp holding one).
pub fn read_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    let value = headers?.inner().get(key)?;
    match value {
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        other => integer(other),
    }
}

/// The value when it is an AMQP integer of any width, and nothing else: no strings, no
/// timestamps. Clients pick different widths for the same number, so all of them count.
pub fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// The text of a string value (long or short); `None` for anything else or for bytes that
/// are not UTF-8.
pub fn text(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

pub fn set_int(table: &mut FieldTable, key: &str, value: i64) {
    table.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
}

pub fn set_bool(table: &mut FieldTable, key: &str, value: bool) {
    table.insert(ShortString::from(key), AMQPValue::Boolean(value));
}

pub fn set_strings(table: &mut FieldTable, key: &str, values: &[String]) {
    let items: Vec<AMQPValue> = values
        .iter()
        .map(|v| AMQPValue::LongString(LongString::from(v.as_str())))
        .collect();
    table.insert(
        ShortString::from(key),
        AMQPValue::FieldArray(FieldArray::from(items)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_back_what_was_written() {
        let mut table = FieldTable::default();
        set_str(&mut table, "s", "v");
        set_int(&mut table, "i", 3);
        set_bool(&mut table, "b", true);
        set_strings(&mut table, "a", &["x".to_owned(), "y".to_owned()]);
        let t = Some(&table);
        let value = |key: &str| table.inner().get(key);
        assert_eq!(read_str(t, "s").as_deref(), Some("v"));
        assert_eq!(read_int(t, "i"), Some(3));
        assert_eq!(value("b"), Some(&AMQPValue::Boolean(true)));
        let items: Vec<Option<&str>> = match value("a") {
            Some(AMQPValue::FieldArray(items)) => items.as_slice().iter().map(text).collect(),
            other => panic!("not an array: {other:?}"),
        };
        assert_eq!(items, [Some("x"), Some("y")]);
        assert_eq!(read_str(t, "missing"), None);
        assert_eq!(read_int(t, "s"), None);
    }

    #[test]
    fn integers_of_every_width_count_and_nothing_else_does() {
        for value in [
            AMQPValue::ShortShortInt(7),
            AMQPValue::ShortShortUInt(7),
            AMQPValue::ShortInt(7),
            AMQPValue::ShortUInt(7),
            AMQPValue::LongInt(7),
            AMQPValue::LongUInt(7),
            AMQPValue::LongLongInt(7),
        ] {
            assert_eq!(integer(&value), Some(7), "{value:?}");
        }
        for value in [
            AMQPValue::LongString("7".into()),
            AMQPValue::Timestamp(7),
            AMQPValue::Double(7.0),
            AMQPValue::Boolean(true),
            AMQPValue::Void,
        ] {
            assert_eq!(integer(&value), None, "{value:?}");
        }
    }
}
