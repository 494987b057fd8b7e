//! Console logging: every byte on the guest console is an emulated port
//! write, so only warnings and errors unless `moat.verbose`.

use std::io::Write;

struct Console;

impl log::Log for Console {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            // One write per line keeps lines whole on the console.
            // Seconds since boot, as the kernel's own lines, to line them up.
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
                .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
                .unwrap_or(0.0);
            let line = format!("moat-agent: [{t:10.3}] {}: {}\n", r.level(), r.args());
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the console logger (stderr, which PID 1 has on the console);
/// `verbose` lowers the level from warnings to debug. Later calls only
/// change the level.
pub fn init(verbose: bool) {
    static LOGGER: Console = Console;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    });
}
