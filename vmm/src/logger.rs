//! A stderr logger: `moat-vmm: [  1.234567] LEVEL message`, level from
//! `MOAT_LOG` (error, warn, info, debug, trace; default info). When stderr
//! is a regular file (the shim's vmm.log), [`cap_stderr_file`] caps it.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::capped_file::CappedFile;

struct StderrLogger {
    start: Instant,
}

impl log::Log for StderrLogger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let line = format!(
            "moat-vmm: [{:4}.{:06}] {:5} {}\n",
            t.as_secs(),
            t.subsec_micros(),
            record.level(),
            record.args()
        );
        let mut file = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner());
        let _ = match file.as_mut() {
            Some(file) => file.write_all(line.as_bytes()),
            None => std::io::stderr().lock().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

/// Where log lines go once stderr is capped.
static LOG_FILE: Mutex<Option<CappedFile>> = Mutex::new(None);

/// If stderr is a regular file, log to it from now on through a
/// [`CappedFile`] of at most `cap` bytes. Must run while the process may
/// still open files: the file is opened again (a description of its own,
/// readable, so rotation can keep the newest lines).
pub fn cap_stderr_file(cap: u64) -> std::io::Result<()> {
    let stderr = std::io::stderr();
    let meta = std::fs::File::from(stderr.as_fd().try_clone_to_owned()?).metadata()?;
    if !meta.is_file() {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/fd/2")?;
    *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(CappedFile::new(file, cap)?);
    Ok(())
}

/// Installs the stderr logger as the process's `log` backend; timestamps
/// count from `start`. Only the first call has an effect.
pub fn init(start: Instant) {
    let level = std::env::var("MOAT_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    if log::set_boxed_logger(Box::new(StderrLogger { start })).is_ok() {
        log::set_max_level(level);
    }
}

/// Lets through at most [`RateLimit::BURST`] log lines per
/// [`RateLimit::WINDOW`]: for messages a guest can trigger at will.
pub struct RateLimit {
    /// Start of the current window and lines logged in it.
    state: Mutex<Option<(Instant, u32)>>,
}

impl RateLimit {
    /// Lines allowed per window.
    pub const BURST: u32 = 10;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A limiter with a fresh window.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(None),
        }
    }

    /// Whether one more line may be logged now.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, count) = match *state {
            Some((start, count)) if now.duration_since(start) < Self::WINDOW => (start, count),
            _ => (now, 0),
        };
        *state = Some((start, count.saturating_add(1)));
        count < Self::BURST
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_a_burst_through_per_window() {
        let limit = RateLimit::new();
        let allowed = (0..1000).filter(|_| limit.allow()).count();
        assert_eq!(allowed, RateLimit::BURST as usize);
    }
}
