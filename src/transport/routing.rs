//! The headers appevents reserves for itself, read into a [`Routing`] (which workflows, which
//! retry, a replay or not), or into the precise reason they are malformed.

use lapin::types::{AMQPValue, FieldTable};
use uuid::Uuid;

use crate::core::event::Invalid;
use crate::transport::headers;

/// What the reserved headers say about how to run a message. A first delivery from a
/// producer has none of them and gets the default: no retries done, every workflow, no
/// replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// Broker-level retries already done (`x-appevents-attempt`).
    pub retries_done: u32,
    /// Only these workflows run (`x-appevents-workflows`): a retry or a replay of one run.
    pub workflows: Option<Vec<Uuid>>,
    /// Dead runs may run again (`x-appevents-replay`).
    pub replay: bool,
    /// Times the broker delivered it before (`x-delivery-count`).
    pub deliveries: i64,
}

const RETRIES_DONE_EXPECTED: &str = "an integer from 0 to 4294967295";
const WORKFLOWS_EXPECTED: &str = "an array of workflow ids";
const WORKFLOWS_EMPTY_EXPECTED: &str = "a non-empty array of workflow ids";
const REPLAY_EXPECTED: &str = "a boolean";

/// Reads and checks the routing headers. Only appevents sets them (on retries and replays),
/// so a malformed one means a producer set a reserved header or a message was tampered
/// with: reading it leniently would run the wrong workflows, skip the replay mark or reset
/// the retry budget, so the message is refused instead.
pub fn routing(headers: Option<&FieldTable>) -> Result<Routing, Invalid> {
    let get = |key: &str| headers.and_then(|h| h.inner().get(key));
    Ok(Routing {
        retries_done: get(headers::RETRIES_DONE)
            .map(retries_done)
            .transpose()?
            .unwrap_or(0),
        workflows: get(headers::WORKFLOWS).map(workflows).transpose()?,
        replay: get(headers::REPLAY)
            .map(replay)
            .transpose()?
            .unwrap_or(false),
        // The broker's own header, not ours: any integer type RabbitMQ or a client picks is
        // fine, and a malformed one reads as a first delivery (the queue's delivery limit
        // still bounds redeliveries).
        deliveries: headers::read_int(headers, headers::DELIVERY_COUNT).unwrap_or(0),
    })
}

fn retries_done(value: &AMQPValue) -> Result<u32, Invalid> {
    headers::integer(value)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(bad_header(headers::RETRIES_DONE, RETRIES_DONE_EXPECTED))
}

fn workflows(value: &AMQPValue) -> Result<Vec<Uuid>, Invalid> {
    let AMQPValue::FieldArray(items) = value else {
        return Err(bad_header(headers::WORKFLOWS, WORKFLOWS_EXPECTED));
    };
    // Empty would run nothing and acknowledge the message: a silent loss, not a routing.
    if items.as_slice().is_empty() {
        return Err(bad_header(headers::WORKFLOWS, WORKFLOWS_EMPTY_EXPECTED));
    }
    items
        .as_slice()
        .iter()
        .map(|item| {
            headers::text(item)
                .and_then(|id| Uuid::parse_str(id).ok())
                .ok_or(bad_header(headers::WORKFLOWS, WORKFLOWS_EXPECTED))
        })
        .collect()
}

fn replay(value: &AMQPValue) -> Result<bool, Invalid> {
    match value {
        AMQPValue::Boolean(replay) => Ok(*replay),
        _ => Err(bad_header(headers::REPLAY, REPLAY_EXPECTED)),
    }
}

fn bad_header(header: &'static str, expected: &'static str) -> Invalid {
    Invalid::BadHeader { header, expected }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert(key.into(), value);
        }
        table
    }

    fn strings(items: &[&str]) -> AMQPValue {
        AMQPValue::FieldArray(
            items
                .iter()
                .map(|s| AMQPValue::LongString((*s).into()))
                .collect::<Vec<_>>()
                .into(),
        )
    }

    #[test]
    fn a_message_without_routing_headers_is_a_first_delivery_to_every_workflow() {
        assert_eq!(routing(None), Ok(Routing::default()));
        assert_eq!(
            routing(Some(&FieldTable::default())),
            Ok(Routing::default())
        );
    }

    #[test]
    fn the_worker_s_own_routing_headers_read_back() {
        let id = Uuid::new_v4();
        let mut table = FieldTable::default();
        headers::set_int(&mut table, headers::RETRIES_DONE, 2);
        headers::set_strings(&mut table, headers::WORKFLOWS, &[id.to_string()]);
        headers::set_bool(&mut table, headers::REPLAY, true);
        table.insert(headers::DELIVERY_COUNT.into(), AMQPValue::ShortUInt(3));

        let read = routing(Some(&table));

        assert_eq!(
            read,
            Ok(Routing {
                retries_done: 2,
                workflows: Some(vec![id]),
                replay: true,
                deliveries: 3,
            })
        );
    }

    #[test]
    fn workflow_ids_are_compared_as_uuids_not_as_text() {
        let id = Uuid::new_v4();
        let table = headers(vec![(
            headers::WORKFLOWS,
            strings(&[&id.to_string().to_uppercase()]),
        )]);
        assert_eq!(
            routing(Some(&table)).map(|r| r.workflows),
            Ok(Some(vec![id]))
        );
    }

    #[test]
    fn the_broker_s_delivery_count_is_read_whatever_its_integer_type() {
        for value in [
            AMQPValue::ShortShortUInt(4),
            AMQPValue::LongInt(4),
            AMQPValue::LongLongInt(4),
        ] {
            let table = headers(vec![(headers::DELIVERY_COUNT, value)]);
            assert_eq!(routing(Some(&table)).map(|r| r.deliveries), Ok(4));
        }
        let junk = headers(vec![(headers::DELIVERY_COUNT, AMQPValue::Boolean(true))]);
        assert_eq!(routing(Some(&junk)).map(|r| r.deliveries), Ok(0));
    }

    #[test]
    fn each_malformed_routing_header_is_refused_with_what_it_must_be() {
        let uuid = Uuid::new_v4().to_string();
        let cases: Vec<(&str, AMQPValue, &str)> = vec![
            (
                headers::RETRIES_DONE,
                AMQPValue::LongString("1".into()),
                RETRIES_DONE_EXPECTED,
            ),
            (
                headers::RETRIES_DONE,
                AMQPValue::LongLongInt(-1),
                RETRIES_DONE_EXPECTED,
            ),
            (
                headers::RETRIES_DONE,
                AMQPValue::LongLongInt(1 << 40),
                RETRIES_DONE_EXPECTED,
            ),
            (
                headers::RETRIES_DONE,
                AMQPValue::Double(1.0),
                RETRIES_DONE_EXPECTED,
            ),
            (
                headers::WORKFLOWS,
                AMQPValue::LongLongInt(1),
                WORKFLOWS_EXPECTED,
            ),
            (
                headers::WORKFLOWS,
                AMQPValue::LongString(uuid.as_str().into()),
                WORKFLOWS_EXPECTED,
            ),
            (
                headers::WORKFLOWS,
                strings(&["not-a-uuid"]),
                WORKFLOWS_EXPECTED,
            ),
            (
                headers::WORKFLOWS,
                strings(&[&uuid, "x"]),
                WORKFLOWS_EXPECTED,
            ),
            (
                headers::WORKFLOWS,
                AMQPValue::FieldArray(vec![AMQPValue::LongLongInt(1)].into()),
                WORKFLOWS_EXPECTED,
            ),
            (headers::WORKFLOWS, strings(&[]), WORKFLOWS_EMPTY_EXPECTED),
            (
                headers::REPLAY,
                AMQPValue::LongString("true".into()),
                REPLAY_EXPECTED,
            ),
            (
                headers::REPLAY,
                AMQPValue::ShortShortUInt(1),
                REPLAY_EXPECTED,
            ),
            (headers::REPLAY, AMQPValue::Void, REPLAY_EXPECTED),
        ];
        for (name, value, expected) in cases {
            let table = headers(vec![(name, value.clone())]);

            let read = routing(Some(&table));

            assert_eq!(
                read,
                Err(Invalid::BadHeader {
                    header: name,
                    expected
                }),
                "{name} = {value:?}"
            );
        }
    }

    #[test]
    fn a_bad_header_reason_names_the_header_and_what_it_must_be() {
        let invalid = bad_header(headers::WORKFLOWS, WORKFLOWS_EXPECTED);
        assert_eq!(invalid.code(), "bad_header");
        assert_eq!(
            invalid.to_string(),
            "header x-appevents-workflows must be an array of workflow ids"
        );
    }
}
