//! Parsers for what the benchmarks read: containerd's log (with the shims'
//! lines relayed into it), `ctr events` output, moat-vmm's log,
//! `/proc/<pid>/smaps_rollup` and `/proc/<pid>/stat`, and moat's config.

use serde_json::Value;

use crate::timestamp;

/// One logfmt line of containerd's log: `time="..." level=info msg="..." k=v`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// Nanoseconds since the epoch.
    pub time: i64,
    pub level: String,
    pub msg: String,
}

/// The value of `key=` in a logfmt line: a quoted string (with `\"`, `\\`,
/// `\n`, `\t` escapes) or a bare word.
fn logfmt_value(line: &str, key: &str) -> Option<String> {
    let mut from = 0;
    let start = loop {
        let at = from + line[from..].find(key)?;
        let after = at + key.len();
        let boundary = at == 0 || line.as_bytes()[at - 1] == b' ';
        if boundary && line[after..].starts_with('=') {
            break after + 1;
        }
        from = after;
    };
    let rest = &line[start..];
    let Some(quoted) = rest.strip_prefix('"') else {
        return Some(rest.split(' ').next().unwrap_or("").to_owned());
    };
    let mut out = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None // unterminated
}

/// Parses one line of containerd's log; None for lines in other formats.
pub fn log_line(line: &str) -> Option<LogLine> {
    Some(LogLine {
        time: timestamp::parse(&logfmt_value(line, "time")?)?,
        level: logfmt_value(line, "level").unwrap_or_default(),
        msg: logfmt_value(line, "msg")?,
    })
}

/// One line of `ctr events`: `<Go time> <namespace> <topic> <json>`.
#[derive(Debug, Clone, PartialEq)]
pub struct CtrEvent {
    pub time: i64,
    pub namespace: String,
    pub topic: String,
    pub body: Value,
}

impl CtrEvent {
    /// The container the event is about (`container_id`, or `id` for
    /// `/containers/*`).
    pub fn container(&self) -> Option<&str> {
        let key = if self.topic.starts_with("/containers/") {
            "id"
        } else {
            "container_id"
        };
        self.body.get(key)?.as_str()
    }

    /// A timestamp field of the body (`exited_at`), in nanoseconds.
    pub fn time_field(&self, key: &str) -> Option<i64> {
        timestamp::parse(self.body.get(key)?.as_str()?)
    }
}

pub fn ctr_event(line: &str) -> Option<CtrEvent> {
    // The time is four words: date, clock, offset, zone name.
    let mut words = line.splitn(7, ' ');
    let time: Vec<&str> = words.by_ref().take(4).collect();
    if time.len() < 4 {
        return None;
    }
    let time = timestamp::parse(&time.join(" "))?;
    let namespace = words.next()?.to_owned();
    let topic = words.next()?.to_owned();
    if !topic.starts_with('/') {
        return None;
    }
    let body = match words.next().map(str::trim) {
        None | Some("") => Value::Null,
        Some(json) => serde_json::from_str(json).ok()?,
    };
    Some(CtrEvent {
        time,
        namespace,
        topic,
        body,
    })
}

/// Pulls "<prefix> N us" out of moat-vmm's log.
pub fn logged_us(log: &str, prefix: &str) -> Option<f64> {
    let rest = &log[log.find(prefix)? + prefix.len()..];
    rest.split_whitespace().next()?.parse::<f64>().ok()
}

/// `Key: N kB` fields of `/proc/<pid>/smaps_rollup`, in KiB.
pub fn smaps_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let mut w = rest.split_whitespace();
        let n = w.next()?.parse().ok()?;
        (w.next() == Some("kB")).then_some(n)
    })
}

/// `(comm, ppid)` from `/proc/<pid>/stat`; the name may hold spaces and
/// parentheses, so it runs to the last `)`.
pub fn stat_comm_ppid(text: &str) -> Option<(String, i32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    Some((comm, rest.next()?.parse().ok()?))
}

/// A top-level `key = "string"` of a TOML file (moat's config); comments
/// and tables are skipped. Enough for `state_dir` and `layer_cache_dir`.
pub fn toml_string(text: &str, key: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            return None; // top-level keys come before any table
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let v = v.trim();
        let (quote, inner) = match v.chars().next()? {
            q @ ('"' | '\'') => (q, &v[1..]),
            _ => return None,
        };
        return inner.find(quote).map(|end| inner[..end].to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_and_shim_log_lines() {
        // containerd's own line (logrus) and a moat shim line (containerd-shim crate).
        let c = r#"time="2025-11-27T18:58:42.000000001Z" level=info msg="loading plugin \"io.containerd.runtime.v2.task\"..." type=io.containerd.runtime.v2"#;
        let l = log_line(c).unwrap();
        assert_eq!(l.time, 1_764_269_922_000_000_001);
        assert_eq!(l.level, "info");
        assert_eq!(
            l.msg,
            r#"loading plugin "io.containerd.runtime.v2.task"..."#
        );

        let s = r#"time="2025-11-27T18:58:43.5Z" level=info msg="sandbox bench-moat-1: moat-vmm pid 42 booting""#;
        let l = log_line(s).unwrap();
        assert_eq!(l.msg, "sandbox bench-moat-1: moat-vmm pid 42 booting");
        assert_eq!(l.time, 1_764_269_923_500_000_000);

        // A bare message word and an escaped newline.
        let b = r#"time="2025-11-27T18:58:42Z" level=warn msg=hello runtime=x"#;
        assert_eq!(log_line(b).unwrap().msg, "hello");
        let n = r#"time="2025-11-27T18:58:42Z" level=error msg="a\nb\\c""#;
        assert_eq!(log_line(n).unwrap().msg, "a\nb\\c");
        // A key inside another key's value is not the key.
        let k = r#"time="2025-11-27T18:58:42Z" level=info xmsg="no" msg="yes""#;
        assert_eq!(log_line(k).unwrap().msg, "yes");

        for bad in [
            "",
            "plain text from a process",
            r#"time="yesterday" level=info msg="x""#,
            r#"time="2025-11-27T18:58:42Z" level=info msg="unterminated"#,
            r#"time="2025-11-27T18:58:42Z" level=info"#,
        ] {
            assert_eq!(log_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ctr_event_lines() {
        let e = ctr_event(
            r#"2025-11-27 18:58:44.25 +0000 UTC default /tasks/exit {"container_id":"r1","id":"r1","pid":7,"exited_at":"2025-11-27T18:58:44.2Z"}"#,
        )
        .unwrap();
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(e.namespace, "default");
        assert_eq!(e.container(), Some("r1"));
        assert_eq!(e.time, 1_764_269_924_250_000_000);
        assert_eq!(e.time_field("exited_at"), Some(1_764_269_924_200_000_000));
        assert_eq!(e.time_field("missing"), None);

        let c = ctr_event(
            r#"2025-11-27 18:58:44 +0000 UTC default /containers/create {"id":"r1","image":"busybox"}"#,
        )
        .unwrap();
        assert_eq!(c.container(), Some("r1"));
        let s = ctr_event("2025-11-27 18:58:44 +0000 UTC default /snapshot/prepare").unwrap();
        assert_eq!(s.body, Value::Null);
        assert_eq!(s.container(), None);

        for bad in [
            "",
            "2025-11-27 18:58:44 +0000",
            "2025-11-27 18:58:44 +0000 UTC default notatopic {}",
            "2025-11-27 18:58:44 +0000 UTC default /tasks/exit {broken",
        ] {
            assert_eq!(ctr_event(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn vmm_log_lines() {
        let log = "moat-vmm: [   0.02] INFO  Guest started after 22520 us\n\
                   moat-vmm: [  30.1] INFO  Guest boot completed after 30100000 us (30100 ms)\n";
        assert_eq!(logged_us(log, "Guest started after"), Some(22520.0));
        assert_eq!(
            logged_us(log, "Guest boot completed after"),
            Some(30_100_000.0)
        );
        assert_eq!(logged_us(log, "Nothing"), None);
        assert_eq!(
            logged_us("Guest started after soon", "Guest started after"),
            None
        );
    }

    #[test]
    fn smaps_rollup_fields() {
        let t = "00400000-7ffd000 ---p 00000000 00:00 0 [rollup]\n\
                 Rss:               26396 kB\n\
                 Pss:               20110 kB\n\
                 Pss_Anon:          18000 kB\n";
        assert_eq!(smaps_kib(t, "Pss"), Some(20110));
        assert_eq!(smaps_kib(t, "Rss"), Some(26396));
        assert_eq!(smaps_kib(t, "Pss_Anon"), Some(18000));
        assert_eq!(smaps_kib(t, "Swap"), None);
        assert_eq!(smaps_kib("Pss: lots kB", "Pss"), None);
    }

    #[test]
    fn proc_stat() {
        assert_eq!(
            stat_comm_ppid("4242 (moat-vmm) S 4200 4242 4242 0 -1 4194560"),
            Some(("moat-vmm".into(), 4200))
        );
        assert_eq!(
            stat_comm_ppid("7 (a) b (c)) R 1 7 7"),
            Some(("a) b (c)".into(), 1))
        );
        assert_eq!(stat_comm_ppid("7 (x) R"), None);
    }

    #[test]
    fn moat_config_keys() {
        let t = "# moat\nkernel = \"/k\"\nstate_dir = \"/run/moat\" # where\n\
                 layer_cache_dir='/var/lib/moat/layers'\nvcpus = 1\n[table]\nx = \"no\"\n";
        assert_eq!(toml_string(t, "state_dir").as_deref(), Some("/run/moat"));
        assert_eq!(
            toml_string(t, "layer_cache_dir").as_deref(),
            Some("/var/lib/moat/layers")
        );
        assert_eq!(toml_string(t, "vcpus"), None);
        assert_eq!(toml_string(t, "x"), None);
        assert_eq!(toml_string(t, "missing"), None);
    }
}
