//! Container and exec ids: both sides enforce the same rule, because ids
//! become path components in the guest and words in the stream handshake.

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is a valid container id or non-empty exec id: 1 to
/// [`MAX_ID_LEN`] characters of `[A-Za-z0-9_.-]`, starting with a letter or
/// digit (so never `.`, `..` or an option-like `-x`).
pub fn is_valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_ID_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `id` is a valid exec id: empty (the init process) or a valid id.
pub fn is_valid_exec_id(id: &str) -> bool {
    id.is_empty() || is_valid_id(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_containerd_style_ids() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("3f1c0e2b9a_pod.ctr-1"));
        assert!(is_valid_id(&"x".repeat(MAX_ID_LEN)));
    }

    #[test]
    fn refuses_path_like_and_odd_ids() {
        for id in [
            "", ".", "..", "../x", "a/b", "-x", ".hidden", "a b", "a\n", "é",
        ] {
            assert!(!is_valid_id(id), "{id:?} must be refused");
        }
        assert!(!is_valid_id(&"x".repeat(MAX_ID_LEN + 1)));
        assert!(is_valid_exec_id(""));
        assert!(!is_valid_exec_id(".."));
    }
}
