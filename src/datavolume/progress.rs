//! Progress of an import or clone: a one-line bar redrawn with `\r` on a terminal, or JSON
//! lines through `tracing` (`bytes`, `total`, `percent`, `rateBytesPerSecond`, `etaSeconds`)
//! at most once a second otherwise — plus a first and a last line, so that even a quick import
//! leaves a trace in the pod log.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressStyle {
    /// A bar on stderr (a terminal).
    Bar,
    /// JSON log lines (pod logs, tests).
    Log,
}

impl ProgressStyle {
    /// `Bar` when stderr is a terminal and JSON logs are not forced.
    pub fn auto(force_json: bool) -> Self {
        if !force_json && std::io::stderr().is_terminal() {
            ProgressStyle::Bar
        } else {
            ProgressStyle::Log
        }
    }
}

const LOG_EVERY: Duration = Duration::from_secs(1);
const BAR_EVERY: Duration = Duration::from_millis(100);

pub(crate) struct Progress {
    dv: String,
    phase: &'static str,
    total: Option<u64>,
    done: u64,
    /// Bytes already there when the transfer began (a resumed download): not in the rate.
    base: u64,
    style: ProgressStyle,
    start: Instant,
    last: Option<Instant>,
    finished: bool,
}

impl Progress {
    /// Learn (or correct) the total once it is known.
    pub(crate) fn set_total(&mut self, total: Option<u64>) {
        if total.is_some() {
            self.total = total;
        }
    }

    pub(crate) fn new(
        dv: &str,
        phase: &'static str,
        total: Option<u64>,
        style: ProgressStyle,
    ) -> Self {
        Progress::resumed(dv, phase, total, 0, style)
    }

    /// Progress of a transfer that begins with `base` bytes already done.
    pub(crate) fn resumed(
        dv: &str,
        phase: &'static str,
        total: Option<u64>,
        base: u64,
        style: ProgressStyle,
    ) -> Self {
        let mut p = Progress {
            dv: dv.to_string(),
            phase,
            total,
            done: base,
            base,
            style,
            start: Instant::now(),
            last: None,
            finished: false,
        };
        p.emit();
        p
    }

    /// `done` bytes so far (absolute, not a delta).
    pub(crate) fn set(&mut self, done: u64) {
        self.done = done;
        let every = match self.style {
            ProgressStyle::Bar => BAR_EVERY,
            ProgressStyle::Log => LOG_EVERY,
        };
        if self.last.is_none_or(|t| t.elapsed() >= every) {
            self.emit();
        }
    }

    pub(crate) fn add(&mut self, n: u64) {
        self.set(self.done.saturating_add(n));
    }

    /// The final line (100 % when the total was known and reached).
    pub(crate) fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.emit();
        if self.style == ProgressStyle::Bar {
            eprintln!();
        }
    }

    fn rate(&self) -> f64 {
        let secs = self.start.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.done.saturating_sub(self.base) as f64 / secs
        } else {
            0.0
        }
    }

    fn eta(&self, rate: f64) -> Option<u64> {
        let total = self.total?;
        if rate <= 0.0 {
            return None;
        }
        Some((total.saturating_sub(self.done) as f64 / rate).ceil() as u64)
    }

    fn emit(&mut self) {
        self.last = Some(Instant::now());
        let rate = self.rate();
        let eta = self.eta(rate);
        let percent = self
            .total
            .filter(|t| *t > 0)
            .map(|t| (self.done.min(t) as f64 * 100.0 / t as f64 * 10.0).round() / 10.0);
        match self.style {
            ProgressStyle::Log => tracing::info!(
                dataVolume = %self.dv,
                phase = self.phase,
                bytes = self.done,
                total = self.total,
                percent,
                rateBytesPerSecond = rate.round() as u64,
                etaSeconds = eta,
                done = self.finished,
                "import progress"
            ),
            ProgressStyle::Bar => {
                let bar = match percent {
                    Some(p) => {
                        let filled = ((p / 100.0) * 24.0).round() as usize;
                        format!(
                            "[{}{}] {p:5.1}%",
                            "#".repeat(filled.min(24)),
                            "-".repeat(24 - filled.min(24))
                        )
                    }
                    None => "[        ??        ]".to_string(),
                };
                let total = self
                    .total
                    .map(|t| format!("/{}", human(t)))
                    .unwrap_or_default();
                let eta = eta.map(|e| format!(" ETA {e}s")).unwrap_or_default();
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r{} {} {bar} {}{total} {}/s{eta}\x1b[K",
                    self.dv,
                    self.phase,
                    human(self.done),
                    human(rate as u64)
                );
                let _ = err.flush();
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An abandoned bar must not leave the cursor mid-line before the error message.
        if !self.finished && self.style == ProgressStyle::Bar {
            eprintln!();
        }
    }
}

/// `1.5 GiB`-style sizes.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(20 << 30), "20.0 GiB");
    }

    #[test]
    fn eta_follows_rate() {
        let mut p = Progress::new("ns/x", "download", Some(1000), ProgressStyle::Log);
        p.done = 250;
        assert_eq!(p.eta(50.0), Some(15));
        assert_eq!(p.eta(0.0), None);
        p.total = None;
        assert_eq!(p.eta(50.0), None);
        p.finish();
    }
}
