//! Structured logs of warren's daemons (the agent, the CA): human-readable
//! text by default, one JSON object per line with `--log-format json` (what
//! log pipelines, and warren's tests, read).

use std::sync::{Arc, Mutex, PoisonError};

use tracing::Dispatch;
use tracing_subscriber::{
    EnvFilter, Registry, fmt, fmt::MakeWriter, layer::SubscriberExt, reload,
    util::SubscriberInitExt,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, logging to stderr. `filter` takes
/// `RUST_LOG` syntax.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    init_with_control(format, filter).map(drop)
}

/// Like [`init`], and returns the handle that changes the filter while the
/// daemon runs (the agent's admin endpoint).
pub fn init_with_control(format: LogFormat, filter: &str) -> Result<LogControl, String> {
    // Colours only for a person at a terminal, not in files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (dispatch, control) = build(format, filter, std::io::stderr, ansi)?;
    dispatch.try_init().map_err(|e| e.to_string())?;
    Ok(control)
}

/// A subscriber like the global one, writing to `writer` without colours,
/// and the handle that changes its filter; not installed, so tests can use
/// it in a scope of their own (`tracing::dispatcher::with_default`).
pub fn subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
) -> Result<(Dispatch, LogControl), String>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    build(format, filter, writer, false)
}

fn build<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
    ansi: bool,
) -> Result<(Dispatch, LogControl), String>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let parsed = directives(filter).map_err(|e| format!("bad --log-level {filter:?}: {e}"))?;
    // Only the filter is reloadable: the formatting layer above it stays as
    // it was built, JSON or text.
    let (filter_layer, handle) = reload::Layer::new(parsed);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let layer = fmt::layer().with_writer(writer).with_ansi(ansi);
    let dispatch = match format {
        LogFormat::Text => Dispatch::new(registry.with(layer)),
        LogFormat::Json => {
            Dispatch::new(registry.with(layer.json().flatten_event(true).with_current_span(false)))
        }
    };
    let control = LogControl {
        handle,
        current: Arc::new(Mutex::new(filter.trim().to_owned())),
    };
    Ok((dispatch, control))
}

/// Changes the log filter of a running daemon. Clones change the same
/// subscriber, which this holds weakly: once it is dropped (a test's),
/// [`set_filter`](Self::set_filter) fails.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter as it was given: `EnvFilter`'s own display reorders the
    /// directives, which would surprise whoever set them.
    current: Arc<Mutex<String>>,
}

impl LogControl {
    /// The filter in force, in `RUST_LOG` syntax.
    pub fn filter(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter with `filter` (`RUST_LOG` syntax). A filter that
    /// does not parse is refused, naming the problem, and the one in force
    /// stays.
    pub fn set_filter(&self, filter: &str) -> Result<(), String> {
        let parsed = parse(filter)?;
        // Held across the reload so that two changes at once leave the text
        // and the filter in force from the same one.
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        // Said before the change, under the filter in force: a new filter
        // that silences everything cannot hide that it was set.
        tracing::warn!(from = %*current, to = %filter.trim(), "log filter changing");
        self.handle
            .reload(parsed)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        *current = filter.trim().to_owned();
        Ok(())
    }
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("filter", &self.filter())
            .finish_non_exhaustive()
    }
}

/// A filter given at runtime. An empty one would parse as "errors only",
/// hardly what was meant by an operator changing it.
fn parse(filter: &str) -> Result<EnvFilter, String> {
    let filter = filter.trim();
    if filter.is_empty() {
        return Err("empty log filter; give e.g. `info` or `info,warren_agent=debug`".into());
    }
    directives(filter).map_err(|e| format!("log filter {filter:?}: {e}"))
}

/// Longer filters are refused: no operator writes one, and each directive
/// costs memory.
pub const MAX_FILTER_LEN: usize = 1024;

/// `filter`'s directives, with field values matched as plain strings, never
/// compiled as regular expressions: a filter may come from a client of the
/// admin endpoint, and a crafted pattern compiles to a DFA that takes
/// seconds and gigabytes (tracing-subscriber's own advice for untrusted
/// filters).
fn directives(filter: &str) -> Result<EnvFilter, String> {
    if filter.len() > MAX_FILTER_LEN {
        return Err(format!(
            "{} bytes long; at most {MAX_FILTER_LEN}",
            filter.len()
        ));
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(filter)
        .map_err(|e| e.to_string())
}

/// Displays an error with its chain of causes (`a: b: c`), since library
/// errors often put the useful part (the errno) in `source()`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            // Errors that embed their source's text already said it.
            if !shown.contains(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use super::{Chain, LogFormat, subscriber};

    /// What a test subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    fn log_both() {
        tracing::debug!(target: "warren_test", "the debug line");
        tracing::info!(target: "warren_test", "the info line");
    }

    #[test]
    fn field_values_are_never_compiled_as_patterns_and_long_filters_are_refused() {
        let (_dispatch, control) = subscriber(LogFormat::Text, "info", std::io::sink).unwrap();
        // With regular expressions this compiles to a DFA of gigabytes; as
        // a plain string it is just a field value to compare.
        let pattern = format!("[span{{x=[01]*1{}}}]=trace", "[01]".repeat(40));
        control.set_filter(&pattern).unwrap();
        assert_eq!(control.filter(), pattern);
        let long = format!("info,{}", "warren_agent=debug,".repeat(60));
        let refused = control.set_filter(&long).unwrap_err();
        assert!(refused.contains("at most 1024"), "{refused}");
        assert_eq!(control.filter(), pattern);
    }

    #[test]
    fn the_filter_changes_at_runtime_and_a_bad_one_changes_nothing() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let captured = Captured::default();
            let writer = captured.clone();
            let (dispatch, control) = subscriber(format, "info", move || writer.clone()).unwrap();
            tracing::dispatcher::with_default(&dispatch, || {
                log_both();
                let written = captured.take();
                assert!(written.contains("the info line"), "{format:?}: {written}");
                assert!(!written.contains("the debug line"), "{format:?}: {written}");

                control.set_filter("info,warren_test=debug").unwrap();
                assert_eq!(control.filter(), "info,warren_test=debug");
                log_both();
                let written = captured.take();
                assert!(written.contains("the debug line"), "{format:?}: {written}");
                if format == LogFormat::Json {
                    // Still one JSON object a line, after the reload.
                    for line in written.lines() {
                        assert!(
                            line.starts_with('{') && line.contains("\"message\":"),
                            "{line}"
                        );
                    }
                }

                let refused = control.set_filter("warren_test=loudest").unwrap_err();
                assert!(refused.contains("warren_test=loudest"), "{refused}");
                let refused = control.set_filter("  ").unwrap_err();
                assert!(refused.contains("empty"), "{refused}");
                assert_eq!(control.filter(), "info,warren_test=debug");
                log_both();
                assert!(captured.take().contains("the debug line"));

                // A clone changes the same subscriber.
                control.clone().set_filter("warn").unwrap();
                assert_eq!(control.filter(), "warn");
                assert!(captured.take().contains("log filter changing"));
                log_both();
                assert_eq!(captured.take(), "");

                // Silencing everything is itself on record, under the
                // filter it replaces.
                control.set_filter("off").unwrap();
                let written = captured.take();
                assert!(
                    written.contains("log filter changing") && written.contains("off"),
                    "{format:?}: {written}"
                );
                tracing::error!(target: "warren_test", "an error line");
                assert_eq!(captured.take(), "");
            });
        }
    }

    #[test]
    fn a_bad_initial_filter_is_refused() {
        let error = subscriber(LogFormat::Text, "info,=,x=y=z", io::sink)
            .err()
            .unwrap();
        assert!(error.starts_with("bad --log-level"), "{error}");
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("attaching failed")]
        Opaque(#[source] std::io::Error),
        #[error("attaching failed: {0}")]
        Embedding(#[source] std::io::Error),
    }

    #[test]
    fn shows_each_cause_once() {
        let io = || std::io::Error::from_raw_os_error(libc::EPERM);
        let opaque = Outer::Opaque(io());
        let embedding = Outer::Embedding(io());
        let expected = format!("attaching failed: {}", io());
        assert_eq!(Chain(&opaque).to_string(), expected);
        assert_eq!(Chain(&embedding).to_string(), expected);
    }
}
