//! The SOQL subset appevents sends: the lookup for a record an earlier attempt created,
//! `SELECT Id FROM Contact WHERE Email = 'a\'b@example.com' AND CreatedDate >= 2026-12-07T11:00:00Z`,
//! and a workflow's `query` step, `SELECT Id, Name FROM Contact WHERE Email = '…' AND
//! Name != null LIMIT 1`: fields, `=` and `!=` joined by `AND`, `LIMIT`. `OR`, functions
//! and relationships are refused, as a malformed query would be.

use serde_json::Value;

use crate::Record;

#[derive(Debug, PartialEq)]
pub struct Query {
    pub object: String,
    /// The selected fields, `Id` first when selected.
    pub fields: Vec<String>,
    /// (field, value) pairs that must all be equal; `None` is SOQL's `null`.
    pub equal: Vec<(String, Option<String>)>,
    /// (field, value) pairs that must all differ.
    pub not_equal: Vec<(String, Option<String>)>,
    pub limit: Option<usize>,
    /// `CreatedDate >= ...`, in seconds since the Unix epoch.
    pub created_since: Option<u64>,
}

impl Query {
    pub fn matches(&self, record: &Record) -> bool {
        record.object == self.object
            && self
                .created_since
                .is_none_or(|since| record.created >= since)
            && self
                .equal
                .iter()
                .all(|(field, value)| field_text(record, field) == *value)
            && self
                .not_equal
                .iter()
                .all(|(field, value)| field_text(record, field) != *value)
    }
}

fn field_text(record: &Record, field: &str) -> Option<String> {
    if field.eq_ignore_ascii_case("Id") {
        return Some(record.id.clone());
    }
    record.fields.get(field).and_then(|v| match v {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    })
}

pub fn parse(text: &str) -> Result<Query, String> {
    let mut tokens = Tokens::new(text)?;
    tokens.keyword("SELECT")?;
    let mut fields = vec![tokens.word()?];
    while tokens.peeked == Some(Token::Comma) {
        tokens.next();
        fields.push(tokens.word()?);
    }
    tokens.keyword("FROM")?;
    let object = tokens.word()?;
    let mut query = Query {
        object,
        fields,
        equal: Vec::new(),
        not_equal: Vec::new(),
        limit: None,
        created_since: None,
    };
    if tokens.is_done() {
        return Ok(query);
    }
    if tokens.peek_keyword("LIMIT") {
        return limit(tokens, query);
    }
    tokens.keyword("WHERE")?;
    loop {
        let field = tokens.word()?;
        let operator = tokens.next().ok_or("expected an operator")?;
        match (field.as_str(), operator) {
            ("CreatedDate", Token::Operator(op)) if op == ">=" => {
                let literal = tokens.word()?;
                query.created_since = Some(datetime(&literal)?);
            }
            (_, Token::Operator(op)) if op == "=" || op == "!=" => {
                let value = match tokens.next().ok_or("expected a value")? {
                    Token::Text(text) => Some(text),
                    Token::Word(word) if word.eq_ignore_ascii_case("null") => None,
                    Token::Word(word) => Some(word),
                    other => return Err(format!("unexpected {other:?}")),
                };
                if op == "=" {
                    query.equal.push((field, value));
                } else {
                    query.not_equal.push((field, value));
                }
            }
            (_, other) => return Err(format!("unsupported condition on {field}: {other:?}")),
        }
        if tokens.is_done() {
            return Ok(query);
        }
        if tokens.peek_keyword("LIMIT") {
            return limit(tokens, query);
        }
        tokens.keyword("AND")?;
    }
}

fn limit(mut tokens: Tokens, mut query: Query) -> Result<Query, String> {
    tokens.keyword("LIMIT")?;
    let count = tokens.word()?;
    query.limit = Some(
        count
            .parse()
            .map_err(|_| format!("LIMIT {count:?} is not a number"))?,
    );
    if !tokens.is_done() {
        return Err(format!("unexpected {:?} after LIMIT", tokens.next()));
    }
    Ok(query)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Operator(String),
    Comma,
}

struct Tokens {
    tokens: std::vec::IntoIter<Token>,
    peeked: Option<Token>,
}

impl Tokens {
    fn new(text: &str) -> Result<Tokens, String> {
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
            } else if c == ',' {
                chars.next();
                tokens.push(Token::Comma);
            } else if c == '\'' {
                chars.next();
                tokens.push(Token::Text(quoted(&mut chars)?));
            } else if matches!(c, '=' | '<' | '>' | '!') {
                let mut op = String::new();
                while let Some(&c) = chars.peek().filter(|c| matches!(c, '=' | '<' | '>' | '!')) {
                    op.push(c);
                    chars.next();
                }
                tokens.push(Token::Operator(op));
            } else if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '+') {
                let mut word = String::new();
                while let Some(&c) = chars.peek().filter(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '+')
                }) {
                    word.push(c);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            } else {
                return Err(format!("unexpected character {c:?}"));
            }
        }
        let mut tokens = tokens.into_iter();
        let peeked = tokens.next();
        Ok(Tokens { tokens, peeked })
    }

    fn next(&mut self) -> Option<Token> {
        std::mem::replace(&mut self.peeked, self.tokens.next())
    }

    fn is_done(&self) -> bool {
        self.peeked.is_none()
    }

    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(&self.peeked, Some(Token::Word(word)) if word.eq_ignore_ascii_case(keyword))
    }

    fn word(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Token::Word(word)) => Ok(word),
            other => Err(format!("expected a name, found {other:?}")),
        }
    }

    fn keyword(&mut self, keyword: &str) -> Result<(), String> {
        match self.next() {
            Some(Token::Word(word)) if word.eq_ignore_ascii_case(keyword) => Ok(()),
            other => Err(format!("expected {keyword}, found {other:?}")),
        }
    }
}

/// A string literal after its opening quote, with SOQL's backslash escapes.
fn quoted(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<String, String> {
    let mut text = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\'' => return Ok(text),
            '\\' => {
                let escaped = match chars.next().ok_or("unterminated escape")? {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    c @ ('\'' | '"' | '\\') => c,
                    other => return Err(format!("invalid escape \\{other}")),
                };
                text.push(escaped);
            }
            other => text.push(other),
        }
    }
    Err("unterminated string literal".into())
}

/// `YYYY-MM-DDThh:mm:ssZ` as seconds since the Unix epoch.
fn datetime(literal: &str) -> Result<u64, String> {
    let invalid = || format!("invalid dateTime literal {literal:?}");
    let bytes = literal.as_bytes();
    if literal.len() != 20 || bytes[10] != b'T' || bytes[19] != b'Z' {
        return Err(invalid());
    }
    let number = |range: std::ops::Range<usize>| -> Result<i64, String> {
        literal
            .get(range)
            .and_then(|part| part.parse().ok())
            .ok_or_else(invalid)
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lookup_appevents_sends_parses_with_its_escapes() {
        let query = parse(
            r"SELECT Id FROM Contact WHERE Email = 'o\'hara\\x@example.com' AND Phone = null AND CreatedDate >= 2026-11-30T00:53:20Z",
        )
        .expect("parses");

        assert_eq!(query.object, "Contact");
        assert_eq!(
            query.equal,
            vec![
                ("Email".to_owned(), Some(r"o'hara\x@example.com".to_owned())),
                ("Phone".to_owned(), None)
            ]
        );
        assert_eq!(query.created_since, Some(1_796_000_000));
    }

    #[test]
    fn a_query_step_s_fields_inequalities_and_limit_parse() {
        let query =
            parse(r"SELECT Id, Name FROM Contact WHERE Email = 'x\' OR Name != \'' AND Name != null LIMIT 1")
                .expect("parses");
        assert_eq!(query.fields, ["Id", "Name"]);
        assert_eq!(
            query.equal,
            vec![("Email".to_owned(), Some("x' OR Name != '".to_owned()))]
        );
        assert_eq!(query.not_equal, vec![("Name".to_owned(), None)]);
        assert_eq!(query.limit, Some(1));
    }

    #[test]
    fn what_is_outside_the_subset_is_refused() {
        assert!(parse("SELECT Id FROM Contact WHERE Email = 'x' OR Email = 'y'").is_err());
        assert!(parse("SELECT Id FROM Contact LIMIT 1 AND x = 'y'").is_err());
        assert!(parse("SELECT COUNT() FROM Contact").is_err());
        assert!(parse("SELECT Id FROM Contact WHERE Email = 'unterminated").is_err());
        assert!(parse("SELECT Id FROM Contact WHERE CreatedDate >= yesterday").is_err());
    }
}
