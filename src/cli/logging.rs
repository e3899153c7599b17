//! Logging for the CLI: `tracing` to stderr, through a writer that hides the progress bars while a line is
//! printed, so logs and bars never tear each other.
//!
//! Level: `-q` → warn, default → info, `-v` → debug, `-vv` → trace, for dream-ood; ONNX Runtime's `ort`
//! crate stays at warn. `RUST_LOG`, when set, replaces all of it (`RUST_LOG=dream_ood=trace,ort=info`).

use std::io::{self, Write};
use std::sync::LazyLock;

use indicatif::MultiProgress;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Every progress bar of the process is drawn through this, so that log lines can suspend them.
pub static BARS: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

/// Installs the global subscriber. `verbosity`: -1 quiet, 0 default, 1 debug, 2+ trace.
pub fn init(verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,dream_ood={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(SuspendingWriter)
        .with_ansi(console_is_tty())
        .with_target(verbosity > 0)
        .init();
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    io::stderr().is_terminal()
}

/// A `MakeWriter` whose writers buffer one event and print it with the bars suspended.
struct SuspendingWriter;

struct EventWriter(Vec<u8>);

impl<'a> MakeWriter<'a> for SuspendingWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter(Vec::with_capacity(256))
    }
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            // A failed write to stderr has nowhere to be reported.
            BARS.suspend(|| {
                let _ = io::stderr().lock().write_all(&self.0);
            });
        }
    }
}
