//! Hostile input: a corpus of malformed messages published raw, as a careless or malicious
//! producer would, between good events, to a running worker. Each must be dead-lettered
//! exactly once with its own precise reason, and none may disturb the good events around
//! it, the worker's readiness or the work queue.

use std::time::Duration;

use appevents::observe::metrics::label;
use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use serde_json::{Map, Value, json};

use crate::support::{CONTACT_CREATED, DeadLetterMessage, TestApp, eventually, readiness};

/// Small, so an oversized body is cheap to publish; large enough for the body with
/// thousands of keys and for the 10,000-character user id, which must fail on their own
/// merits and not on size.
const MAX_BYTES: usize = 65_536;
const MAX_DEPTH: usize = 32;
/// Names each hostile message so its dead letter can be matched to its case: the worker
/// carries the headers it does not own into the letter.
const CASE_HEADER: &str = "x-hostile-case";
/// What the UTF-8 cases put before their bad bytes: the reason names this offset.
const UTF8_PREFIX: &[u8] = br#"{"name":""#;
const UTF8_SUFFIX: &[u8] = br#"","user_id":"u","payload":{}}"#;
/// Keys in the payload of the many-keys event: about 50 KB, under the size limit (checked).
const MANY_KEYS: usize = 5_000;

/// One hostile message and what its dead letter's reason must contain.
struct Case {
    name: &'static str,
    body: Vec<u8>,
    properties: BasicProperties,
    reason: String,
}

fn case(
    name: &'static str,
    body: Vec<u8>,
    properties: BasicProperties,
    reason: impl Into<String>,
) -> Case {
    Case {
        name,
        body,
        properties,
        reason: reason.into(),
    }
}

/// The corpus, as a table: case name, message, reason. Reasons are quoted as the worker
/// writes them after `invalid event: `; a reason that ends early is a prefix of the full one
/// (serde_json's messages go on with a line and column). One row per line, so unformatted.
#[rustfmt::skip]
fn corpus() -> Vec<Case> {
    let json = json_properties;
    let utf8 = utf8_offset();
    let over = "x".repeat(300);
    let long_user = "u".repeat(10_000);
    let uuid = uuid::Uuid::new_v4().to_string();
    let oversized = oversized_body();
    let oversized_len = oversized.len();
    vec![
        // Bytes that are not UTF-8.
        case("lone continuation byte", utf8_with(&[0x80]), json(), format!("body is not valid UTF-8 (first bad byte at offset {utf8})")),
        case("truncated 3-byte sequence", utf8_with(&[0xE2, 0x82]), json(), format!("body is not valid UTF-8 (first bad byte at offset {utf8})")),
        case("truncated sequence at the end", b"{\"name\":\"\xF0\x9F\x9A".to_vec(), json(), format!("body is not valid UTF-8 (first bad byte at offset {utf8})")),
        case("overlong encoding of /", utf8_with(&[0xC0, 0xAF]), json(), format!("body is not valid UTF-8 (first bad byte at offset {utf8})")),
        case("UTF-16 surrogate encoded in UTF-8", utf8_with(&[0xED, 0xA0, 0x80]), json(), format!("body is not valid UTF-8 (first bad byte at offset {utf8})")),
        case("0xFF byte", utf8_with(&[0xFF]), json(), format!("body is not valid UTF-8 (first bad byte at offset {utf8})")),
        case("Latin-1 body", b"{\"name\":\"Caf\xE9\",\"user_id\":\"u\",\"payload\":{}}".to_vec(), json(), "body is not valid UTF-8 (first bad byte at offset 12)"),
        // Text that is not JSON.
        case("empty body", Vec::new(), json(), "body is not JSON: EOF while parsing a value"),
        case("whitespace-only body", b" \n\t ".to_vec(), json(), "body is not JSON: EOF while parsing a value"),
        case("truncated JSON", br#"{"name":"Contact Created","user_id":"u","pay"#.to_vec(), json(), "body is not JSON: EOF while parsing"),
        case("non-JSON text", b"Contact Created for u".to_vec(), json(), "body is not JSON: expected value at line 1 column 1"),
        case("trailing garbage", br#"{"name":"Contact Created","user_id":"u","payload":{}} x"#.to_vec(), json(), "body is not JSON: trailing characters"),
        case("byte order mark", "\u{feff}{\"name\":\"n\",\"user_id\":\"u\",\"payload\":{}}".as_bytes().to_vec(), json(), "body is not JSON: expected value at line 1 column 1"),
        case("single quotes", b"{'name':'n','user_id':'u','payload':{}}".to_vec(), json(), "body is not JSON: key must be a string"),
        case("raw newline inside a string", b"{\"name\":\"a\nb\",\"user_id\":\"u\",\"payload\":{}}".to_vec(), json(), "body is not JSON: control character (\\u0000-\\u001F) found while parsing a string"),
        case("lone surrogate escape", br#"{"name":"\ud800","user_id":"u","payload":{}}"#.to_vec(), json(), "body is not JSON: unexpected end of hex escape"),
        case("NaN", br#"{"name":"n","user_id":"u","payload":{"x":NaN}}"#.to_vec(), json(), "body is not JSON: expected value"),
        case("number out of range", br#"{"name":"n","user_id":"u","payload":{"x":1e400}}"#.to_vec(), json(), "body is not JSON: number out of range"),
        // JSON that is not an object.
        case("JSON array", b"[1,2,3]".to_vec(), json(), "body is a JSON array, not an object"),
        case("JSON string", br#""Contact Created""#.to_vec(), json(), "body is a JSON string, not an object"),
        case("JSON number", b"42".to_vec(), json(), "body is a JSON number, not an object"),
        case("JSON true", b"true".to_vec(), json(), "body is a JSON boolean, not an object"),
        case("JSON null", b"null".to_vec(), json(), "body is a JSON null, not an object"),
        // Required fields missing or of the wrong type.
        case("missing name", without("name"), json(), "field `name` is missing"),
        case("missing user_id", without("user_id"), json(), "field `user_id` is missing"),
        case("missing payload", without("payload"), json(), "field `payload` is missing"),
        case("null name", with("name", Value::Null), json(), "field `name` is missing"),
        case("name as number", with("name", json!(7)), json(), "field `name` must be a string, found number"),
        case("name as array", with("name", json!(["Contact Created"])), json(), "field `name` must be a string, found array"),
        case("name as object", with("name", json!({"en": "Contact Created"})), json(), "field `name` must be a string, found object"),
        case("name as bool", with("name", json!(true)), json(), "field `name` must be a string, found boolean"),
        case("user_id as number", with("user_id", json!(12345)), json(), "field `user_id` must be a string, found number"),
        case("user_id as array", with("user_id", json!(["u"])), json(), "field `user_id` must be a string, found array"),
        case("user_id as object", with("user_id", json!({"id": "u"})), json(), "field `user_id` must be a string, found object"),
        case("user_id as bool", with("user_id", json!(false)), json(), "field `user_id` must be a string, found boolean"),
        case("payload as number", with("payload", json!(1)), json(), "field `payload` must be an object, found number"),
        case("payload as array", with("payload", json!([{"email": "a@b.c"}])), json(), "field `payload` must be an object, found array"),
        case("payload as string", with("payload", json!("{\"email\":\"a@b.c\"}")), json(), "field `payload` must be an object, found string"),
        case("payload as bool", with("payload", json!(true)), json(), "field `payload` must be an object, found boolean"),
        case("payload as null", with("payload", Value::Null), json(), "field `payload` must be an object, found null"),
        // Text fields that break the rules.
        case("empty name", with("name", json!("")), json(), "field `name` is empty"),
        case("whitespace-only name", with("name", json!(" \t ")), json(), "field `name` is empty"),
        case("empty user_id", with("user_id", json!("")), json(), "field `user_id` is empty"),
        case("whitespace-only user_id", with("user_id", json!("   ")), json(), "field `user_id` is empty"),
        case("300-character name", with("name", json!(over)), json(), "field `name` is 300 characters, over the 255-character limit"),
        case("10,000-character user_id", with("user_id", json!(long_user)), json(), "field `user_id` is 10000 characters, over the 255-character limit"),
        case("256 two-byte characters in name", with("name", json!("é".repeat(256))), json(), "field `name` is 256 characters, over the 255-character limit"),
        case("newline in name", with("name", json!("Contact\nCreated")), json(), "field `name` contains control characters"),
        case("NUL in name", with("name", json!("Contact\u{0}Created")), json(), "field `name` contains control characters"),
        case("escape in name", with("name", json!("\u{1b}[31mContact Created")), json(), "field `name` contains control characters"),
        case("newline in user_id", with("user_id", json!("u\n")), json(), "field `user_id` contains control characters"),
        case("NUL in user_id", with("user_id", json!("u\u{0}")), json(), "field `user_id` contains control characters"),
        case("escape in user_id", with("user_id", json!("\u{1b}]0;pwned\u{7}u")), json(), "field `user_id` contains control characters"),
        case("id as number", with("id", json!(42)), json(), "field `id` must be a string, found number"),
        case("empty id", with("id", json!("")), json(), "field `id` is empty"),
        case("occurred_at not RFC 3339", with("occurred_at", json!("yesterday")), json(), "field `occurred_at` is not an RFC 3339 timestamp: \"yesterday\""),
        case("occurred_at without offset", with("occurred_at", json!("2026-11-26 19:00:00")), json(), "field `occurred_at` is not an RFC 3339 timestamp: \"2026-11-26 19:00:00\""),
        // Size and shape.
        case("body over the size limit", oversized, json(), format!("body is {oversized_len} bytes, over the {MAX_BYTES}-byte limit")),
        case("payload nested 40 deep", nested(40), json(), format!("body nests deeper than {MAX_DEPTH} levels")),
        case("60,000 unclosed brackets", "[".repeat(60_000).into_bytes(), json(), format!("body nests deeper than {MAX_DEPTH} levels")),
        // Properties.
        case("content type text/plain", event_body("ct-plain"), content_type("text/plain"), "content type \"text/plain\" is not application/json"),
        case("content type application/xml", event_body("ct-xml"), content_type("application/xml"), "content type \"application/xml\" is not application/json"),
        case("content type garbage", event_body("ct-garbage"), content_type("%%; ;=\u{1}json"), "content type \"%%; ;=\\u{1}json\" is not application/json"),
        case("content type application/jsonx", event_body("ct-jsonx"), content_type("application/jsonx"), "content type \"application/jsonx\" is not application/json"),
        case("empty content type", event_body("ct-empty"), content_type(""), "content type \"\" is not application/json"),
        case("empty message_id and no body id", without("id"), json().with_message_id("".into()), "message_id property is empty"),
        case("whitespace message_id and no body id", without("id"), json().with_message_id("  ".into()), "message_id property is empty"),
        case("newline in message_id and no body id", without("id"), json().with_message_id("m\n1".into()), "message_id property contains control characters"),
        // Reserved headers of the wrong type or value.
        case("attempt as a string", event_body("h-attempt-string"), reserved("x-appevents-attempt", AMQPValue::LongString("1".into())), "header x-appevents-attempt must be an integer from 0 to 4294967295"),
        case("attempt negative", event_body("h-attempt-negative"), reserved("x-appevents-attempt", AMQPValue::LongLongInt(-1)), "header x-appevents-attempt must be an integer from 0 to 4294967295"),
        case("workflows as an integer", event_body("h-workflows-int"), reserved("x-appevents-workflows", AMQPValue::LongLongInt(1)), "header x-appevents-workflows must be an array of workflow ids"),
        case("workflows as an array of non-UUIDs", event_body("h-workflows-junk"), reserved("x-appevents-workflows", strings(&["hs", "*"])), "header x-appevents-workflows must be an array of workflow ids"),
        case("workflows as a bare UUID string", event_body("h-workflows-string"), reserved("x-appevents-workflows", AMQPValue::LongString(uuid.as_str().into())), "header x-appevents-workflows must be an array of workflow ids"),
        case("workflows empty", event_body("h-workflows-empty"), reserved("x-appevents-workflows", strings(&[])), "header x-appevents-workflows must be a non-empty array of workflow ids"),
        case("replay as a string", event_body("h-replay-string"), reserved("x-appevents-replay", AMQPValue::LongString("true".into())), "header x-appevents-replay must be a boolean"),
        case("replay as an integer", event_body("h-replay-int"), reserved("x-appevents-replay", AMQPValue::ShortShortUInt(1)), "header x-appevents-replay must be a boolean"),
    ]
}

fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

fn content_type(value: &str) -> BasicProperties {
    BasicProperties::default().with_content_type(value.into())
}

fn reserved(header: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(header.into(), value);
    json_properties().with_headers(headers)
}

fn strings(items: &[&str]) -> AMQPValue {
    let items: Vec<AMQPValue> = items
        .iter()
        .map(|item| AMQPValue::LongString((*item).into()))
        .collect();
    AMQPValue::FieldArray(FieldArray::from(items))
}

fn utf8_offset() -> usize {
    UTF8_PREFIX.len()
}

fn utf8_with(bad: &[u8]) -> Vec<u8> {
    [UTF8_PREFIX, bad, UTF8_SUFFIX].concat()
}

/// A valid event's fields, for a case to break one of.
fn fields(id: &str) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("id".into(), json!(id));
    fields.insert("name".into(), json!(CONTACT_CREATED));
    fields.insert("user_id".into(), json!("u"));
    fields.insert(
        "payload".into(),
        json!({"email": format!("{id}@example.com")}),
    );
    fields
}

fn to_bytes(fields: Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(&Value::Object(fields)).expect("a map serializes")
}

/// A valid event body: what the cases about properties and headers send.
fn event_body(id: &str) -> Vec<u8> {
    to_bytes(fields(id))
}

fn with(field: &str, value: Value) -> Vec<u8> {
    let mut fields = fields("hostile");
    fields.insert(field.to_owned(), value);
    to_bytes(fields)
}

fn without(field: &str) -> Vec<u8> {
    let mut fields = fields("hostile");
    fields.remove(field);
    to_bytes(fields)
}

fn oversized_body() -> Vec<u8> {
    let mut fields = fields("oversized");
    fields.insert(
        "payload".into(),
        json!({"email": "big@example.com", "notes": "n".repeat(MAX_BYTES)}),
    );
    to_bytes(fields)
}

/// A valid event whose payload holds `depth` nested arrays (the body and the payload
/// objects are two more levels).
fn nested(depth: usize) -> Vec<u8> {
    let inner = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    format!(r#"{{"name":"{CONTACT_CREATED}","user_id":"u","payload":{{"deep":{inner}}}}}"#)
        .into_bytes()
}

/// A good event: the event and the properties it is published with.
struct Good {
    id: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

fn good(id: String, payload: Value, properties: BasicProperties) -> Good {
    let body = serde_json::to_vec(
        &json!({"id": id, "name": CONTACT_CREATED, "user_id": "u", "payload": payload}),
    )
    .expect("serializes");
    Good {
        properties: properties.with_message_id(id.as_str().into()),
        id,
        body,
    }
}

/// One good event per hostile case, to publish after it. The first ones are legal but
/// unusual, so the checks above are shown not to refuse them: thousands of keys, control
/// characters and emoji inside the payload, the routing headers as appevents writes them
/// (workflow id in upper case), a charset parameter, no content type at all, and the
/// broker's delivery count as a string.
fn good_events(count: usize, workflow: uuid::Uuid) -> Vec<Good> {
    let email = |id: &str| format!("{id}@example.com");
    let many_keys: Map<String, Value> = (0..MANY_KEYS)
        .map(|i| (format!("k{i:04}"), json!(1)))
        .chain([("email".to_owned(), json!(email("good-many-keys")))])
        .collect();
    let mut routing = FieldTable::default();
    routing.insert("x-appevents-attempt".into(), AMQPValue::ShortShortUInt(0));
    routing.insert(
        "x-appevents-workflows".into(),
        strings(&[&workflow.to_string().to_uppercase()]),
    );
    routing.insert("x-appevents-replay".into(), AMQPValue::Boolean(false));
    let mut delivery_count = FieldTable::default();
    delivery_count.insert("x-delivery-count".into(), AMQPValue::LongString("1".into()));
    let mut events = vec![
        good(
            "good-many-keys".into(),
            Value::Object(many_keys),
            json_properties(),
        ),
        good(
            "good-odd-payload".into(),
            json!({"email": email("good-odd-payload"), "first_name": "Zoë 🚀\n\u{0}\u{1b}[0m"}),
            json_properties(),
        ),
        good(
            "good-routing-headers".into(),
            json!({"email": email("good-routing-headers")}),
            json_properties().with_headers(routing),
        ),
        good(
            "good-charset".into(),
            json!({"email": email("good-charset")}),
            content_type("application/json; charset=utf-8"),
        ),
        good(
            "good-no-content-type".into(),
            json!({"email": email("good-no-content-type")}),
            BasicProperties::default(),
        ),
        good(
            "good-delivery-count-string".into(),
            json!({"email": email("good-delivery-count-string")}),
            json_properties().with_headers(delivery_count),
        ),
    ];
    let plain = count.saturating_sub(events.len());
    events.extend((0..plain).map(|i| {
        let id = format!("good-{i}");
        let payload = json!({"email": email(&id), "first_name": "Good"});
        good(id, payload, json_properties())
    }));
    events
}

/// The case's properties with its name in a header of its own.
fn tagged(properties: &BasicProperties, name: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(CASE_HEADER.into(), AMQPValue::LongString(name.into()));
    properties.clone().with_headers(headers)
}

fn events_counted(app: &TestApp, outcome: &str) -> u64 {
    app.worker()
        .context
        .metrics
        .events
        .get_or_create(&label("outcome", outcome))
        .get()
}

fn letters_of<'a>(letters: &'a [DeadLetterMessage], case: &str) -> Vec<&'a DeadLetterMessage> {
    letters
        .iter()
        .filter(|l| l.header(CASE_HEADER).as_deref() == Some(case))
        .collect()
}

#[tokio::test]
async fn every_hostile_message_is_dead_lettered_once_with_its_reason_and_good_events_flow() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| {
        s.worker.max_message_bytes = MAX_BYTES;
        s.worker.max_json_depth = MAX_DEPTH;
    })
    .await;
    let workflow = app.hubspot_workflow(&crm.url()).await;
    app.start_worker().await;
    let cases = corpus();
    let goods = good_events(cases.len(), workflow);
    assert!(cases.len() >= 30, "the corpus has {} cases", cases.len());
    let many_keys = goods.iter().find(|g| g.id == "good-many-keys");
    assert!(many_keys.is_some_and(|g| g.body.len() < MAX_BYTES));

    // Act: each hostile message, then a good event, in one channel's order.
    for (hostile, good) in cases.iter().zip(&goods) {
        let properties = tagged(&hostile.properties, hostile.name);
        app.publish_raw(CONTACT_CREATED, &hostile.body, properties)
            .await;
        app.publish_raw(CONTACT_CREATED, &good.body, good.properties.clone())
            .await;
    }

    // Everything is settled once the worker has counted every message.
    let settled = eventually(Duration::from_secs(60), || async {
        events_counted(&app, "invalid") >= cases.len() as u64
            && events_counted(&app, "processed") >= goods.len() as u64
    })
    .await;
    let letters = app.take_dead_letters().await;
    let strays: Vec<Option<String>> = letters
        .iter()
        .filter(|l| l.header(CASE_HEADER).is_none())
        .map(|l| l.header("x-appevents-reason"))
        .collect();
    assert!(
        settled,
        "settled {} invalid of {}, {} processed of {}; letters of no case: {strays:?}",
        events_counted(&app, "invalid"),
        cases.len(),
        events_counted(&app, "processed"),
        goods.len()
    );

    // Each hostile message: one dead letter, its own reason, its bytes kept as they came.
    let mut failures = Vec::new();
    for case in &cases {
        let expected = format!("invalid event: {}", case.reason);
        let found = letters_of(&letters, case.name);
        let reasons: Vec<Option<String>> = found
            .iter()
            .map(|l| l.header("x-appevents-reason"))
            .collect();
        let right = match found.as_slice() {
            [letter] => {
                letter
                    .header("x-appevents-reason")
                    .is_some_and(|r| r.starts_with(&expected))
                    && letter.header("x-appevents-reason-code").as_deref() == Some("invalid")
                    && letter.body == case.body
            }
            _ => false,
        };
        if !right {
            failures.push(format!(
                "{}: expected once {expected:?}, got {reasons:?}",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(letters.len(), cases.len(), "no other dead letters");
    assert_eq!(events_counted(&app, "invalid"), cases.len() as u64);
    assert_eq!(events_counted(&app, "poison"), 0);
    assert_eq!(events_counted(&app, "unmatched"), 0);

    // A valid body under a bad header: the letter names the event for operators.
    let bad_header = letters_of(&letters, "workflows as an integer");
    assert_eq!(
        bad_header[0].header("x-appevents-event-id").as_deref(),
        Some("h-workflows-int")
    );

    // Each good event: processed once, its run succeeded; nothing hostile ran.
    assert_eq!(events_counted(&app, "processed"), goods.len() as u64);
    let runs = app.all_runs().await;
    assert_eq!(runs.len(), goods.len(), "one run per good event: {runs:#?}");
    for good in &goods {
        let of_event: Vec<_> = runs.iter().filter(|r| r.event_id == good.id).collect();
        assert!(
            matches!(of_event.as_slice(), [run] if run.status == RunStatus::Succeeded),
            "{}: {of_event:#?}",
            good.id
        );
    }
    let records = crm.standin.records();
    assert_eq!(records.len(), goods.len(), "one contact per good event");
    let odd = records
        .iter()
        .find(|r| r.fields.get("email") == Some(&json!("good-odd-payload@example.com")))
        .expect("the odd payload's contact");
    assert_eq!(odd.fields["firstname"], json!("Zoë 🚀\n\u{0}\u{1b}[0m"));

    // The worker is unharmed and the queues are drained.
    let (status, body) = readiness(&app).await;
    assert_eq!(status, 200, "{body}");
    let drained = eventually(Duration::from_secs(10), || async {
        app.queue_depth(&app.settings.amqp.queue).await == 0
    })
    .await;
    assert!(drained, "the work queue is drained");
    let queue = app.settings.amqp.queue.clone();
    assert_eq!(
        app.unacknowledged_after_stop(&queue).await,
        0,
        "and every message acknowledged"
    );
    for (_, retry_queue) in &crate::support::worker_topology(&app.settings).retry_queues {
        assert_eq!(app.queue_depth(retry_queue).await, 0, "{retry_queue}");
    }
    app.cleanup().await;
}
