//! Pieces of command-line parsing the subcommands share.

use std::slice::Iter;
use std::time::Duration;

/// The value that follows `flag`.
pub fn value(it: &mut Iter<'_, String>, flag: &str) -> Result<String, String> {
    it.next()
        .cloned()
        .ok_or_else(|| format!("{flag} needs a value"))
}

/// `--runs`: a positive number.
pub fn runs(v: &str) -> Result<usize, String> {
    v.parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("--runs: not a positive number: {v:?}"))
}

/// `v` as a finite number.
fn finite(v: &str) -> Option<f64> {
    v.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// A duration in (fractional) seconds for `flag`; 0 only if `allow_zero`.
pub fn seconds(flag: &str, v: &str, allow_zero: bool) -> Result<Duration, String> {
    finite(v)
        .filter(|s| *s > 0.0 || (allow_zero && *s == 0.0))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{flag}: not a number of seconds: {v:?}"))
}

/// A positive (fractional) number for `flag`.
pub fn positive(flag: &str, v: &str) -> Result<f64, String> {
    finite(v)
        .filter(|x| *x > 0.0)
        .ok_or_else(|| format!("{flag}: not a positive number: {v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_runs_and_seconds() {
        let args = ["--x".to_string(), "v".to_string()];
        let mut it = args.iter();
        assert_eq!(value(&mut it, "--a"), Ok("--x".into()));
        assert_eq!(value(&mut it, "--b"), Ok("v".into()));
        assert_eq!(value(&mut it, "--c"), Err("--c needs a value".into()));
        assert_eq!(runs("3"), Ok(3));
        assert!(runs("0").is_err() && runs("-1").is_err() && runs("x").is_err());
        assert_eq!(
            seconds("--t", "1.5", false),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(seconds("--t", "0", true), Ok(Duration::ZERO));
        assert!(seconds("--t", "0", false).is_err());
        for bad in ["-1", "inf", "NaN", "x"] {
            assert!(seconds("--t", bad, true).is_err(), "{bad}");
        }
    }
}
