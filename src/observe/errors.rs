//! How an error and its causes read as one line, in the CLI's messages and in logs.

use std::error::Error;

/// An error and its causes joined by ": ", each cause once. Error types often put their
/// cause in their own message *and* return it as their source (`#[error("x: {0}")]` with
/// `#[source]`, lapin's and tokio-postgres's errors); a cause whose text is already written
/// is skipped, so no message repeats itself however its chain is built. Line breaks in a
/// message become spaces.
pub fn chain<'a>(errors: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut line = String::new();
    for error in errors {
        let text = one_line(&error.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// [`chain`] of one error and its sources.
pub fn report(error: &(dyn Error + 'static)) -> String {
    chain(std::iter::successors(Some(error), |e| (*e).source()))
}

/// [`chain`] of an `anyhow` error: its contexts, then the error and its sources.
pub fn report_any(error: &anyhow::Error) -> String {
    chain(error.chain().map(|e| e as &(dyn Error + 'static)))
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("field `payload` must be an object, found array")]
    struct Root;

    #[derive(Debug, thiserror::Error)]
    #[error("invalid event: {0}")]
    struct Wrapper(#[from] Root);

    #[derive(Debug, thiserror::Error)]
    #[error("db error")]
    struct Terse(#[source] Root);

    #[test]
    fn a_cause_in_its_parents_message_is_not_repeated() {
        assert_eq!(
            report(&Wrapper(Root)),
            "invalid event: field `payload` must be an object, found array"
        );
    }

    #[test]
    fn a_cause_not_in_the_message_is_appended() {
        assert_eq!(
            report(&Terse(Root)),
            "db error: field `payload` must be an object, found array"
        );
    }

    #[test]
    fn anyhow_context_reads_the_same() {
        let err = anyhow::Error::from(Wrapper(Root)).context("publishing");
        assert_eq!(
            report_any(&err),
            "publishing: invalid event: field `payload` must be an object, found array"
        );
    }
}
