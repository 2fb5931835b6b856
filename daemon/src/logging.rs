//! Structured logs of warren's daemons (the agent, the CA): human-readable
//! text by default, one JSON object per line with `--log-format json` (what
//! log pipelines, and warren's tests, read).

use tracing_subscriber::{EnvFilter, fmt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, logging to stderr. `filter` takes
/// `RUST_LOG` syntax.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("bad --log-level {filter:?}: {e}"))?;
    // Colours only for a person at a terminal, not in files and collectors.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
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
    use super::Chain;

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
