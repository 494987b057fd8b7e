//! The crash trail of moat's programs (the shim, moat-vmm and the agent):
//! a panic hook that writes the panic's message and a backtrace to the
//! program's stderr, which each program points where a person will look
//! (containerd's log for the shim daemon, `vmm.log` for moat-vmm, the
//! serial console for the agent).
//!
//! The release profile aborts on panic, so this report is all that is left
//! of a panic there. The message goes out first, in one write: resolving
//! the backtrace reads the executable, which a thread's seccomp filter may
//! forbid. So the raw return addresses (for `addr2line`) come next, found
//! without a system call, and the resolved backtrace last.
//!
//! [`error_chain`] is how these programs write an error that did not panic:
//! the error and its causes on one line.

mod frames;

use std::backtrace::Backtrace;
use std::io::Write;
use std::panic::PanicHookInfo;
use std::sync::Mutex;

/// Where a report goes.
pub type Sink = Box<dyn Write + Send>;

/// Installs the hook for `program`, writing to stderr.
pub fn install(program: &'static str) {
    install_with(program, || Box::new(std::io::stderr()));
}

/// Installs the hook for `program`, writing each report to a fresh
/// `sink()`.
pub fn install_with(program: &'static str, sink: fn() -> Sink) {
    // One report at a time: panics on two threads would interleave.
    static REPORTING: Mutex<()> = Mutex::new(());
    std::panic::set_hook(Box::new(move |info| {
        let _one = REPORTING.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = sink();
        let _ = out.write_all(headline(program, info).as_bytes());
        let _ = out.flush();
        let raw = format!(
            "{program}: return addresses (addr2line -f -C -e FILE ADDR):\n{}",
            frames::listing()
        );
        let _ = out.write_all(raw.as_bytes());
        let _ = out.flush();
        let trace = format!("{program}: backtrace:\n{}\n", Backtrace::force_capture());
        let _ = out.write_all(trace.as_bytes());
        let _ = out.flush();
    }));
}

/// `PROGRAM: thread 'NAME' panicked at FILE:LINE:COL: MESSAGE`.
fn headline(program: &str, info: &PanicHookInfo) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let at = info
        .location()
        .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    format!("{program}: thread '{name}' panicked{at}: {message}\n")
}

/// Panics when the environment variable `MOAT_CRASH_AT` is `point`, so that
/// tests can check a real process's crash trail. Compiled into debug builds
/// only: in a release build this does nothing.
#[inline]
#[track_caller]
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("MOAT_CRASH_AT").is_ok_and(|p| p == point) {
        panic!("crash point {point} reached (MOAT_CRASH_AT)");
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// An error and its sources as one line: "outer: inner: root cause".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn error_chain_joins_every_cause() {
        let outer = Wrapped("write image", std::io::Error::other("disk full"));
        assert_eq!(error_chain(&outer), "write image: disk full");
    }

    /// An error with a source, as thiserror's `#[source]` makes them.
    #[derive(Debug)]
    struct Wrapped(&'static str, std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }

    static REPORTS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    /// Appends to `REPORTS`.
    struct Recorder;

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            REPORTS.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // The only test of this crate that panics: the hook is process-wide.
    #[test]
    fn report_has_message_location_and_backtrace() {
        install_with("moat-test", || Box::new(Recorder));
        let line = line!() + 3;
        let joined = std::thread::Builder::new()
            .name("doomed".into())
            .spawn(|| panic!("boom {}", 42))
            .unwrap()
            .join();
        let _ = std::panic::take_hook();
        assert!(joined.is_err());
        let report = String::from_utf8(REPORTS.lock().unwrap().clone()).unwrap();
        let (headline, _) = report.split_once('\n').unwrap();
        let at = format!("moat-test: thread 'doomed' panicked at {}:{line}:", file!());
        assert!(headline.starts_with(&at), "{report}");
        assert!(headline.ends_with(": boom 42"), "{report}");
        assert!(report.contains("moat-test: backtrace:\n"), "{report}");
        // A captured backtrace names the function that panicked.
        assert!(
            report.contains("report_has_message_location_and_backtrace"),
            "{report}"
        );
        assert_raw_addresses_resolve(&report);
    }

    /// The raw addresses of the executable resolve, with addr2line, to the
    /// closure that panicked.
    fn assert_raw_addresses_resolve(report: &str) {
        let raw = report
            .split_once("moat-test: return addresses (addr2line -f -C -e FILE ADDR):\n")
            .expect("a list of return addresses")
            .1;
        let addrs: Vec<&str> = raw
            .lines()
            .map_while(|l| l.strip_prefix("  "))
            .filter_map(|l| l.strip_suffix(" exe"))
            .collect();
        assert!(addrs.len() > 3, "{report}");
        let exe = std::env::current_exe().unwrap();
        let Ok(out) = std::process::Command::new("addr2line")
            .args(["-f", "-C", "-e"])
            .arg(&exe)
            .args(&addrs)
            .output()
        else {
            eprintln!("!!! SKIPPED resolving raw addresses: no addr2line (binutils)");
            return;
        };
        let names = String::from_utf8_lossy(&out.stdout);
        assert!(
            names.contains("report_has_message_location_and_backtrace::{{closure}}"),
            "{names}\n{report}"
        );
    }
}
