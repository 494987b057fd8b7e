//! A stderr logger: `moat-vmm: [  1.234567] LEVEL message`, level from
//! `MOAT_LOG` (error, warn, info, debug, trace; default info).

use std::io::Write;
use std::time::Instant;

struct StderrLogger {
    start: Instant,
}

impl log::Log for StderrLogger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let t = self.start.elapsed();
            let _ = writeln!(
                std::io::stderr().lock(),
                "moat-vmm: [{:4}.{:06}] {:5} {}",
                t.as_secs(),
                t.subsec_micros(),
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
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
