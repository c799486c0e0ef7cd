//! The dead-letter queue: letters grouped by reason code and message, with the CLI's
//! filters (`dlq list`); replay and purge shown first as a dry run of what would move, then
//! done once confirmed, as a job whose progress the page shows.
//!
//! - `GET /console/dead-letters`: groups and letters;
//! - `GET /console/dead-letters/{replay|purge}`: the preview, and the confirmation form;
//! - `POST /console/dead-letters/{replay|purge}`: do it (CSRF, audit log);
//! - `GET /console/dead-letters/raw`: the body of the first letter matching, as sent.

use std::collections::{BTreeMap, HashMap};

use askama::Template;
use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use uuid::Uuid;

use super::{Chrome, Console, Operator, Refusal, html, jobs, truncate, walk_letters, when};
use crate::catalog::workflows;
use crate::store::audit::Action;
use crate::transport::dead_letter::{self, Filter, Letter};

/// Letters listed on a page; the groups count them all.
const SHOWN: usize = 200;
/// Bytes of a payload shown before it is cut, with a link to all of it.
const PAYLOAD_SHOWN: usize = 2048;

/// The filters as typed, to fill the form again and to build links.
#[derive(Debug, Clone, Default)]
pub struct FilterForm {
    pub event: String,
    pub event_id: String,
    pub user: String,
    pub workflow: String,
    pub reason: String,
    pub older_than: String,
    pub newer_than: String,
}

const FIELDS: [&str; 7] = [
    "event",
    "event_id",
    "user",
    "workflow",
    "reason",
    "older_than",
    "newer_than",
];

impl FilterForm {
    fn from_map(map: &HashMap<String, String>) -> FilterForm {
        let field = |name: &str| {
            map.get(name)
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        FilterForm {
            event: field("event"),
            event_id: field("event_id"),
            user: field("user"),
            workflow: field("workflow"),
            reason: field("reason"),
            older_than: field("older_than"),
            newer_than: field("newer_than"),
        }
    }

    fn values(&self) -> [&str; 7] {
        [
            &self.event,
            &self.event_id,
            &self.user,
            &self.workflow,
            &self.reason,
            &self.older_than,
            &self.newer_than,
        ]
    }

    /// The filter, or what is wrong with a value.
    fn parse(&self) -> Result<Filter, String> {
        let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        let age = |name: &str, value: &str| {
            text(value)
                .map(|v| {
                    humantime::parse_duration(&v)
                        .map_err(|_| format!("{name} {v:?} is not a duration like 30m, 2h or 7d"))
                })
                .transpose()
        };
        let workflow_id = text(&self.workflow)
            .map(|v| {
                Uuid::parse_str(&v).map_err(|_| format!("workflow {v:?} is not a workflow id"))
            })
            .transpose()?;
        Ok(Filter {
            event_id: text(&self.event_id),
            event_name: text(&self.event),
            user_id: text(&self.user),
            workflow_id,
            reason: text(&self.reason),
            older_than: age("older than", &self.older_than)?,
            newer_than: age("newer than", &self.newer_than)?,
        })
    }

    /// The filters as a query string (without `?`).
    pub fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in FIELDS.iter().zip(self.values()) {
            if !value.is_empty() {
                query.append_pair(name, value);
            }
        }
        query.finish()
    }

    /// The filters given, as the audit log records them.
    pub fn describe(&self) -> String {
        let given: Vec<String> = FIELDS
            .iter()
            .zip(self.values())
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| format!("{name}={value:?}"))
            .collect();
        if given.is_empty() {
            "every dead letter".to_owned()
        } else {
            format!("dead letters with {}", given.join(", "))
        }
    }

    /// The hidden fields that carry the filters in a form.
    pub fn hidden(&self) -> Vec<(&'static str, String)> {
        FIELDS
            .iter()
            .zip(self.values())
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| (*name, value.to_owned()))
            .collect()
    }

    fn with_reason(&self, reason: &str) -> FilterForm {
        FilterForm {
            reason: reason.to_owned(),
            ..self.clone()
        }
    }

    fn of_letter(letter: &Letter) -> FilterForm {
        FilterForm {
            event_id: letter.event_id.clone().unwrap_or_default(),
            user: letter.user_id.clone().unwrap_or_default(),
            workflow: letter.workflow_id.clone().unwrap_or_default(),
            ..FilterForm::default()
        }
    }
}

/// One group: a reason code and message, and how many letters carry them.
pub struct Group {
    pub code: String,
    pub reason: String,
    pub count: usize,
    pub query: String,
}

/// One letter as the page shows it.
pub struct LetterView {
    pub position: usize,
    pub at: String,
    pub event_name: String,
    pub event_id: String,
    pub user: String,
    pub workflow: String,
    pub attempts: String,
    pub code: String,
    pub reason: String,
    pub payload: String,
    pub truncated: bool,
    pub bytes: usize,
    /// The query that finds just this letter.
    pub query: String,
}

impl LetterView {
    fn of(letter: &Letter, names: &HashMap<String, String>) -> LetterView {
        let (payload, truncated) = truncate(&letter.body, PAYLOAD_SHOWN);
        LetterView {
            position: letter.position,
            at: letter.dead_lettered_at.map(when).unwrap_or_default(),
            event_name: letter.event_name.clone().unwrap_or_default(),
            event_id: letter.event_id.clone().unwrap_or_default(),
            user: letter.user_id.clone().unwrap_or_default(),
            workflow: letter
                .workflow_id
                .as_ref()
                .map(|id| names.get(id).unwrap_or(id).clone())
                .unwrap_or_default(),
            attempts: letter
                .provider_calls
                .map(|calls| calls.to_string())
                .unwrap_or_default(),
            code: letter.reason_code.clone(),
            reason: letter.reason.clone(),
            payload,
            truncated,
            bytes: letter.body_bytes,
            query: FilterForm::of_letter(letter).query(),
        }
    }
}

/// What one walk of the queue found.
struct Found {
    matched: usize,
    scanned: usize,
    groups: Vec<Group>,
    letters: Vec<LetterView>,
}

/// Walks the queue with `filter`, looking only.
async fn look(console: &Console, form: &FilterForm, filter: &Filter) -> Result<Found, Refusal> {
    let mut letters = Vec::new();
    let mut groups: BTreeMap<(String, String), usize> = BTreeMap::new();
    let report = walk_letters(console, filter, dead_letter::Action::List, |letter| {
        *groups
            .entry((letter.reason_code.clone(), letter.reason.clone()))
            .or_default() += 1;
        if letters.len() < SHOWN {
            letters.push(letter.clone());
        }
    })
    .await
    .map_err(unavailable)?;
    let names = workflows::names(&console.pool).await;
    let mut groups: Vec<Group> = groups
        .into_iter()
        .map(|((code, reason), count)| Group {
            query: form.with_reason(&reason).query(),
            code,
            reason,
            count,
        })
        .collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.code.cmp(&b.code)));
    Ok(Found {
        matched: report.matched,
        scanned: report.scanned,
        groups,
        letters: letters.iter().map(|l| LetterView::of(l, &names)).collect(),
    })
}

fn unavailable(message: String) -> Refusal {
    tracing::warn!(error = %message, "console: the broker is unavailable");
    Refusal::page(
        StatusCode::SERVICE_UNAVAILABLE,
        "The broker is unavailable",
        format!("The dead-letter queue cannot be read just now: {message}"),
    )
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct ListPage {
    chrome: Chrome,
    form: FilterForm,
    error: Option<String>,
    found: Option<Found>,
    query: String,
}

pub(super) async fn list(
    State(console): State<Console>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    let form = FilterForm::from_map(&query);
    let chrome = Chrome::of(&operator, "dead-letters");
    let filter = match form.parse() {
        Ok(filter) => filter,
        Err(error) => {
            return Ok(html(
                StatusCode::BAD_REQUEST,
                ListPage {
                    chrome,
                    query: form.query(),
                    form,
                    error: Some(error),
                    found: None,
                },
            ));
        }
    };
    let found = look(&console, &form, &filter).await?;
    Ok(html(
        StatusCode::OK,
        ListPage {
            chrome,
            query: form.query(),
            form,
            error: None,
            found: Some(found),
        },
    ))
}

/// Replay or purge, from the path.
fn action_of(path: &str) -> Result<Action, Refusal> {
    match path {
        "replay" => Ok(Action::Replay),
        "purge" => Ok(Action::Purge),
        other => Err(Refusal::page(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("No dead-letter action {other:?}: replay or purge."),
        )),
    }
}

#[derive(Template)]
#[template(path = "console/dead_letter_action.html")]
struct PreviewPage {
    chrome: Chrome,
    action: &'static str,
    form: FilterForm,
    describe: String,
    found: Found,
}

pub(super) async fn preview(
    State(console): State<Console>,
    operator: Operator,
    Path(action): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    let action = action_of(&action)?;
    let form = FilterForm::from_map(&query);
    let filter = form
        .parse()
        .map_err(|error| Refusal::page(StatusCode::BAD_REQUEST, "Invalid filter", error))?;
    let found = look(&console, &form, &filter).await?;
    Ok(html(
        StatusCode::OK,
        PreviewPage {
            chrome: Chrome::of(&operator, "dead-letters"),
            action: action.as_str(),
            describe: form.describe(),
            form,
            found,
        },
    ))
}

pub(super) async fn start(
    State(console): State<Console>,
    operator: Operator,
    Path(action): Path<String>,
    Form(posted): Form<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    operator.check(posted.get("csrf").map_or("", String::as_str))?;
    let action = action_of(&action)?;
    let form = FilterForm::from_map(&posted);
    let filter = form
        .parse()
        .map_err(|error| Refusal::page(StatusCode::BAD_REQUEST, "Invalid filter", error))?;
    let expected = posted
        .get("expected")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let id = jobs::start(
        &console,
        &operator,
        action,
        filter,
        form.describe(),
        expected,
    )
    .await?;
    Ok(Redirect::to(&format!("/console/jobs/{id}")).into_response())
}

pub(super) async fn raw(
    State(console): State<Console>,
    _operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    let form = FilterForm::from_map(&query);
    let filter = form
        .parse()
        .map_err(|error| Refusal::page(StatusCode::BAD_REQUEST, "Invalid filter", error))?;
    let mut first: Option<Letter> = None;
    walk_letters(&console, &filter, dead_letter::Action::List, |letter| {
        if first.is_none() {
            first = Some(letter.clone());
        }
    })
    .await
    .map_err(unavailable)?;
    let letter = first.ok_or_else(|| {
        Refusal::page(
            StatusCode::NOT_FOUND,
            "Not found",
            "No dead letter matches.",
        )
    })?;
    // JSON is served as JSON (a browser shows it as text); anything else as plain text.
    let content_type = if serde_json::from_str::<serde_json::Value>(&letter.body).is_ok() {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    Ok(([(header::CONTENT_TYPE, content_type)], letter.body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_filter_values_are_refused_with_a_message() {
        let form = FilterForm {
            workflow: "not-a-uuid".into(),
            ..FilterForm::default()
        };
        assert!(form.parse().unwrap_err().contains("not a workflow id"));
        let form = FilterForm {
            older_than: "yesterday-ish".into(),
            ..FilterForm::default()
        };
        assert!(form.parse().unwrap_err().contains("not a duration"));
    }

    #[test]
    fn filters_round_trip_through_links() {
        let form = FilterForm {
            reason: "retries exhausted: a & b".into(),
            user: "ada".into(),
            ..FilterForm::default()
        };
        let query = form.query();
        let map: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let again = FilterForm::from_map(&map);
        assert_eq!(again.reason, form.reason);
        assert_eq!(again.user, "ada");
        assert_eq!(
            form.describe(),
            "dead letters with user=\"ada\", reason=\"retries exhausted: a & b\""
        );
    }
}
