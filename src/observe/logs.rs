//! Logging, set up once by the binary before anything else runs.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber: JSON lines (with the current span's fields, so every
/// line of a run carries its event, workflow and user ids, and the spans it sits in) or
/// human-readable text.
/// `RUST_LOG` overrides the configured filter. Logs go to stderr; stdout is for results.
pub fn init(settings: &LogSettings) {
    let configured = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.filter.clone());
    let filter = EnvFilter::new(with_quiet_libraries(&configured));
    // Colour codes only where a person reads them, never in a file or a pipe.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written is dropped: reporting it with eprintln! would
        // panic where stderr is gone (a closed pipe), killing the task that logged it, such
        // as the one that turns SIGTERM into a shutdown.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    // A second initialisation (tests, the demo inside a process that already logs) is harmless.
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// Libraries that report what we report ourselves, unless the filter names them: lapin logs
/// every failed connection as several ERROR lines of debug output, which the caller then
/// reports once, in its own words; tokio-postgres logs the server's NOTICEs (such as the
/// migrations' "relation already exists, skipping") at INFO.
const QUIET: &[(&str, &str)] = &[
    ("lapin", "lapin=off"),
    ("tokio_postgres", "tokio_postgres=warn"),
];

fn with_quiet_libraries(filter: &str) -> String {
    let mut directives = filter.to_owned();
    for (target, directive) in QUIET {
        if !filter.contains(target) {
            if !directives.is_empty() {
                directives.push(',');
            }
            directives.push_str(directive);
        }
    }
    directives
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_quiet_unless_the_filter_names_them() {
        assert_eq!(
            with_quiet_libraries("info"),
            "info,lapin=off,tokio_postgres=warn"
        );
        assert_eq!(
            with_quiet_libraries("warn,lapin=debug"),
            "warn,lapin=debug,tokio_postgres=warn"
        );
    }
}
