//! Logging, set up once by the binary before anything else runs.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber: JSON lines (with the current span's fields, so every
/// line of a run carries its event, workflow and user ids, and the spans it sits in) or
/// human-readable text.
/// `RUST_LOG` overrides the configured filter. Logs go to stderr; stdout is for results.
pub fn init(settings: &LogSettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
