//! A progress line on stderr: redrawn in place on a terminal, a plain line
//! every few seconds otherwise (so logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};
use svp_train::Progress;

/// Draws [`Progress`] at a bounded rate.
pub struct ProgressLine {
    tty: bool,
    last: Option<Instant>,
    epochs: usize,
}

impl ProgressLine {
    /// A progress line for a run of `epochs` epochs.
    pub fn new(epochs: usize) -> Self {
        Self { tty: std::io::stderr().is_terminal(), last: None, epochs }
    }

    /// Shows `p` if enough time has passed since the last update.
    pub fn update(&mut self, p: &Progress) {
        let every = if self.tty { Duration::from_millis(100) } else { Duration::from_secs(10) };
        let now = Instant::now();
        let due = self.last.is_none_or(|t| now.duration_since(t) >= every);
        if !due && p.batch != p.batches {
            return;
        }
        if !self.tty && p.batch == p.batches {
            return; // the epoch line follows
        }
        self.last = Some(now);
        let width = 30;
        let filled = width * p.batch / p.batches.max(1);
        let bar: String = "#".repeat(filled) + &".".repeat(width - filled);
        let line = format!(
            "epoch {}/{} [{bar}] {}/{} loss {:.4} {:.0} samples/s",
            p.epoch, self.epochs, p.batch, p.batches, p.loss, p.samples_per_s
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Clears the line before other output.
    pub fn clear(&mut self) {
        if self.tty && self.last.is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
        self.last = None;
    }
}
