//! Progress of `svp train` on stderr: a live bar on a terminal (indicatif),
//! and in a log (stderr not a terminal) a plain line only for an epoch that
//! runs long, every [`LOG_EVERY`]: the epoch line on stdout follows every
//! epoch anyway, and a line at an epoch's first batch would show an empty
//! bar and the rate of one step.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};
use svp_train::Progress;

/// How often a log gets a progress line inside a long epoch.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How often a terminal's bar gets a new loss and rate.
const MESSAGE_EVERY: Duration = Duration::from_millis(200);

/// Shows [`Progress`] as the output allows.
pub struct ProgressLine {
    epochs: usize,
    /// The epoch on screen now, and when its last line or message was made.
    current: Option<(usize, Instant)>,
    out: Output,
}

enum Output {
    /// The epoch's bar (on a terminal).
    Bar(Option<ProgressBar>),
    /// Lines into a log.
    Log,
}

impl ProgressLine {
    /// Progress for a run of `epochs` epochs.
    pub fn new(epochs: usize) -> Self {
        let out = if std::io::stderr().is_terminal() { Output::Bar(None) } else { Output::Log };
        Self { epochs, current: None, out }
    }

    /// Shows `p`.
    pub fn update(&mut self, p: &Progress) {
        let now = Instant::now();
        let new_epoch = self.current.is_none_or(|(e, _)| e != p.epoch);
        if new_epoch {
            self.clear();
            self.current = Some((p.epoch, now));
        }
        let Some((_, last)) = &mut self.current else { return };
        let status = format!("loss {:.4} {:.0} samples/s", p.loss, p.samples_per_s);
        match &mut self.out {
            Output::Bar(bar) => match bar {
                None => *bar = Some(new_bar(p, self.epochs, status)),
                Some(bar) => {
                    if now.duration_since(*last) >= MESSAGE_EVERY {
                        bar.set_message(status);
                        *last = now;
                    }
                    bar.set_position(p.batch as u64);
                }
            },
            Output::Log => {
                if p.batch < p.batches && now.duration_since(*last) >= LOG_EVERY {
                    let line =
                        format!("epoch {}/{}: {}/{} batches, {status}", p.epoch, self.epochs, p.batch, p.batches);
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                    *last = now;
                }
            }
        }
    }

    /// Takes the bar off the screen before other output.
    pub fn clear(&mut self) {
        if let Output::Bar(bar) = &mut self.out
            && let Some(b) = bar.take()
        {
            b.finish_and_clear();
        }
        self.current = None;
    }
}

/// The bar of `p`'s epoch, first drawn at `p`'s step with `status`.
fn new_bar(p: &Progress, epochs: usize, status: String) -> ProgressBar {
    let style = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}, {eta} left")
        .expect("a valid template")
        .progress_chars("#>.");
    let bar = ProgressBar::with_draw_target(Some(p.batches as u64), ProgressDrawTarget::hidden()).with_style(style);
    bar.set_prefix(format!("{}/{epochs}", p.epoch));
    bar.set_message(status);
    bar.set_position(p.batch as u64);
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar
}
