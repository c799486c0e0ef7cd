//! A rate limit: at most `calls` calls per `per`, written `100/10s`. Limits are parsed where
//! they are defined (configuration, `connection create`, the API), so a bad one is refused
//! there and never met by a worker.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub calls: u32,
    pub per: Duration,
}

impl RateLimit {
    /// Calls per second.
    pub fn per_second(&self) -> f64 {
        f64::from(self.calls) / self.per.as_secs_f64()
    }

    /// The interval in whole milliseconds, as Postgres stores it.
    pub fn interval_ms(&self) -> i32 {
        i32::try_from(self.per.as_millis()).unwrap_or(i32::MAX)
    }

    /// From the stored columns; `None` unless both are positive.
    pub fn from_columns(calls: Option<i32>, interval_ms: Option<i32>) -> Option<RateLimit> {
        let calls = u32::try_from(calls?).ok().filter(|c| *c > 0)?;
        let ms = u64::try_from(interval_ms?).ok().filter(|ms| *ms > 0)?;
        Some(RateLimit {
            calls,
            per: Duration::from_millis(ms),
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.calls, humantime::format_duration(self.per))
    }
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<RateLimit, String> {
        let (calls, per) = text.trim().split_once('/').ok_or_else(|| {
            format!("{text:?} is not a limit: write calls/interval, e.g. 100/10s")
        })?;
        let calls: i64 = calls
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {calls:?} is not a whole number of calls"))?;
        if calls <= 0 {
            return Err(format!(
                "{text:?}: the number of calls must be at least 1 (to stop calls, switch the workflows off)"
            ));
        }
        let calls = u32::try_from(calls).map_err(|_| format!("{text:?}: too many calls"))?;
        let per = humantime::parse_duration(per.trim())
            .map_err(|e| format!("{text:?}: {per:?} is not an interval ({e})"))?;
        if per < Duration::from_millis(1) || per > Duration::from_secs(86_400) {
            return Err(format!(
                "{text:?}: the interval must be between 1ms and 24h"
            ));
        }
        Ok(RateLimit { calls, per })
    }
}

/// A limit, or `none` (no limit of its own), as an option takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOrNone(pub Option<RateLimit>);

impl FromStr for LimitOrNone {
    type Err = String;

    fn from_str(text: &str) -> Result<LimitOrNone, String> {
        parse_optional(text).map(LimitOrNone)
    }
}

/// An optional limit as configured: empty or `none` for no limit.
pub fn parse_optional(text: &str) -> Result<Option<RateLimit>, String> {
    match text.trim() {
        "" | "none" => Ok(None),
        other => other.parse().map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_as_calls_per_interval() {
        assert_eq!(
            "100/10s".parse::<RateLimit>(),
            Ok(RateLimit {
                calls: 100,
                per: Duration::from_secs(10)
            })
        );
        assert_eq!(
            " 5 / 250ms ".parse::<RateLimit>().map(|l| l.per_second()),
            Ok(20.0)
        );
        assert_eq!(parse_optional("none"), Ok(None));
        assert_eq!(parse_optional(""), Ok(None));
        assert_eq!(
            "190/10s".parse::<RateLimit>().map(|l| l.to_string()),
            Ok("190/10s".to_owned())
        );
    }

    #[test]
    fn zero_negative_and_unparsable_limits_are_refused() {
        for (text, says) in [
            ("0/10s", "at least 1"),
            ("-5/10s", "at least 1"),
            ("ten/10s", "not a whole number"),
            ("100", "not a limit"),
            ("100/soon", "not an interval"),
            ("100/0s", "between 1ms and 24h"),
            ("100/2d", "between 1ms and 24h"),
        ] {
            let err = text.parse::<RateLimit>().expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn stored_columns_read_back_only_when_positive() {
        assert_eq!(
            RateLimit::from_columns(Some(100), Some(10_000)),
            Some(RateLimit {
                calls: 100,
                per: Duration::from_secs(10)
            })
        );
        assert_eq!(RateLimit::from_columns(Some(0), Some(10_000)), None);
        assert_eq!(RateLimit::from_columns(Some(100), None), None);
    }
}
