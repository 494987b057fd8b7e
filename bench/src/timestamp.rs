//! Wall-clock timestamps as nanoseconds since the Unix epoch: parsing the
//! two formats the logs use, and formatting a UTC date for reports.
//!
//! - RFC 3339, as the shims and containerd write them in the log
//!   (`2025-11-27T18:58:42.123456789Z`, `...+01:00`), and as `ctr events`
//!   prints `exited_at`;
//! - Go's `time.Time` `String()`, which `ctr events` prints first on each
//!   line (`2025-11-27 18:58:42.123456789 +0000 UTC`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Days from 1970-01-01 to the proleptic Gregorian date `y-m-d`.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Count years from March so that the leap day ends a year.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // 0..=399
    let mp = (m + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // 0..=365
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // 0..=146096
    era * 146_097 + doe - 719_468
}

/// The date `(y, m, d)` of `days` after 1970-01-01 (inverse of the above).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `YYYY-MM-DD(T| )HH:MM:SS[.fraction]` followed by a zone: `Z`,
/// `±HH:MM`, or (Go) ` ±HHMM NAME`. Anything after the zone is ignored.
pub fn parse(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.len() < 19 || !s.is_char_boundary(19) {
        return None;
    }
    let (date, rest) = s.split_at(10);
    let mut d = date.split('-');
    let (y, mo, da) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let rest = rest.strip_prefix('T').or_else(|| rest.strip_prefix(' '))?;
    let (clock, mut rest) = rest.split_at(8);
    let mut c = clock.split(':');
    let (h, mi, se) = (num(c.next()?)?, num(c.next()?)?, num(c.next()?)?);
    if c.next().is_some() || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut nanos = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        // Keep nanosecond precision; drop anything finer.
        for (i, b) in frac.bytes().take(digits).enumerate() {
            if i < 9 {
                nanos = nanos * 10 + i64::from(b - b'0');
            }
        }
        nanos *= 10i64.pow(9u32.saturating_sub(digits as u32));
        rest = &frac[digits..];
    }
    let zone = rest.trim_start();
    let offset_secs = if zone.starts_with('Z') {
        0
    } else {
        let sign = match zone.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let z = &zone[1..];
        let (hh, mm) = if z.as_bytes().get(2) == Some(&b':') {
            (z.get(..2)?, z.get(3..5)?)
        } else {
            (z.get(..2)?, z.get(2..4)?)
        };
        sign * (num(hh)? * 3600 + num(mm)? * 60)
    };
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se - offset_secs;
    Some(secs * 1_000_000_000 + nanos)
}

/// Nanoseconds since the epoch of `t`.
pub fn nanos_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC) of nanoseconds since the epoch.
pub fn format_utc(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn epoch_and_known_dates() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(0));
        // `date -u -d 2000-03-01 +%s` = 951868800 (after a 400-year leap day).
        assert_eq!(parse("2000-03-01T00:00:00Z"), Some(951_868_800 * S));
        // `date -u -d '2025-11-27 18:58:42' +%s` = 1764269922.
        assert_eq!(parse("2025-11-27T18:58:42Z"), Some(1_764_269_922 * S));
        assert_eq!(parse("1969-12-31T23:59:59Z"), Some(-S));
    }

    #[test]
    fn fractions_and_zones() {
        let base = 1_764_269_922 * S;
        assert_eq!(parse("2025-11-27T18:58:42.5Z"), Some(base + S / 2));
        assert_eq!(
            parse("2025-11-27T18:58:42.123456789Z"),
            Some(base + 123_456_789)
        );
        // Digits past nanoseconds are dropped.
        assert_eq!(
            parse("2025-11-27T18:58:42.1234567891Z"),
            Some(base + 123_456_789)
        );
        assert_eq!(parse("2025-11-27T19:58:42.25+01:00"), Some(base + S / 4));
        assert_eq!(parse("2025-11-27T17:28:42-01:30"), Some(base));
        // Go's time.Time String(), as `ctr events` prints it.
        assert_eq!(
            parse("2025-11-27 18:58:42.000001 +0000 UTC"),
            Some(base + 1000)
        );
        assert_eq!(parse("2025-11-27 19:58:42 +0100 CET"), Some(base));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2025-11-27",
            "2025-11-27T18:58:42",      // no zone
            "2025-13-27T18:58:42Z",     // month
            "2025-11-27X18:58:42Z",     // separator
            "2025-11-27T18:58:42.Z",    // empty fraction
            "2025-11-27T18:58:42 CET",  // zone name without offset
            "2025-11-27T1a:58:42Z",     // digit
            "2025-11-27T18:58:42+1",    // short offset
            "2025-11-27T18:58:4é+0100", // not ASCII
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn civil_round_trip() {
        for days in [-719_468, -1, 0, 1, 10_957, 11_016, 20_419, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(format_utc(1_764_269_922 * S + 5), "2025-11-27T18:58:42Z");
        assert_eq!(format_utc(-S), "1969-12-31T23:59:59Z");
    }
}
