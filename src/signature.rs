//! Callback authentication: `sign = MD5(key + t)` and the `t` validity window.
//!
//! The sign covers only `t`, not the body, so the window is the main replay defence: a captured
//! (t, sign) pair is only good until `t` passes, and a `t` far in the future is refused outright
//! so a leaked pair cannot be valid for long.

use std::fmt;
use std::path::Path;

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// `MD5(key + t)` as 32 lowercase hex characters, as Tencent computes it.
pub fn sign(key: &str, t: i64) -> String {
    hex::encode(digest(key, t))
}

/// The 16 bytes a sign spells in hex. Checking a callback compares these, so that nothing is
/// allocated on the way (the decimal `t` is formatted on the stack).
fn digest(key: &str, t: i64) -> [u8; 16] {
    let mut hasher = Md5::new();
    hasher.update(key.as_bytes());
    hasher.update(itoa::Buffer::new().format(t).as_bytes());
    hasher.finalize().into()
}

/// The callback keys accepted at once (several during a key rotation).
#[derive(Clone, Default)]
pub struct Keys(Vec<String>);

/// Keys never reach a log line, even through `{:?}`.
impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys(<{} redacted>)", self.0.len())
    }
}

impl Keys {
    /// Keys from a comma-separated list (the `CSS_CALLBACK_KEY` form).
    pub fn from_list(list: &str) -> Self {
        Keys(Self::clean(list.split(',')))
    }

    /// Keys from a file with one key a line; blank lines and `#` comments are skipped.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Keys(Self::clean(
            text.lines().filter(|l| !l.trim_start().starts_with('#')),
        )))
    }

    fn clean<'a>(parts: impl Iterator<Item = &'a str>) -> Vec<String> {
        parts
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn extend(&mut self, other: Keys) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key used to sign outgoing callbacks (`simulate`).
    pub fn first(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }

    /// True if `candidate` is the sign of `t` under any key. Every key is tried, so the time
    /// taken does not tell which one matched.
    fn matches(&self, t: i64, candidate: &str) -> bool {
        // Hex in either case; anything that is not 32 hex digits matches no key. Refusing it
        // early tells the sender only what it sent.
        let mut wanted = [0u8; 16];
        if hex::decode_to_slice(candidate.trim(), &mut wanted).is_err() {
            return false;
        }
        let mut found = subtle::Choice::from(0);
        for key in &self.0 {
            found |= digest(key, t).ct_eq(&wanted);
        }
        found.into()
    }
}

/// Why a callback was refused; each maps to an `outcome` label and a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("sign missing or wrong")]
    BadSignature,
    #[error("t has expired")]
    Expired,
    #[error("t is too far in the future")]
    TooFarAhead,
}

/// Checks `t` and `sign` of each callback.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// `None` when running with `--callback.insecure-skip-verify`.
    keys: Option<Keys>,
    /// Tolerated lag of our clock behind Tencent's, in seconds.
    clock_skew: i64,
    /// Longest accepted distance of `t` ahead of now, in seconds.
    max_validity: i64,
}

impl Verifier {
    pub fn new(keys: Option<Keys>, clock_skew_secs: i64, max_validity_secs: i64) -> Self {
        Verifier {
            keys,
            clock_skew: clock_skew_secs,
            max_validity: max_validity_secs,
        }
    }

    /// The sign is checked before `t`, so a forged request is reported as a bad signature
    /// whatever its `t`, and `expired` only ever means a genuine but stale (or replayed) callback.
    pub fn verify(&self, t: i64, sign: Option<&str>, now: i64) -> Result<(), Rejection> {
        if let Some(keys) = &self.keys {
            match sign {
                Some(sign) if keys.matches(t, sign) => {}
                _ => return Err(Rejection::BadSignature),
            }
        }
        if t < now.saturating_sub(self.clock_skew) {
            return Err(Rejection::Expired);
        }
        if t > now.saturating_add(self.max_validity) {
            return Err(Rejection::TooFarAhead);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_matches_a_known_md5_vector() {
        // md5("abc1545116519"), computed independently with coreutils' md5sum.
        assert_eq!(sign("abc", 1545116519), "285f459db3ef3a8bb83f381b8a74f6d0");
    }

    #[test]
    fn sign_is_md5_of_key_followed_by_decimal_t() {
        // md5("0"): well-known digests.
        assert_eq!(sign("", 0), "cfcd208495d565ef66e7dff9f98764da");
    }

    fn verifier(keys: &str) -> Verifier {
        Verifier::new(Some(Keys::from_list(keys)), 60, 900)
    }

    #[test]
    fn accepts_any_configured_key_case_insensitively() {
        let v = verifier("old, new");
        let now = 1_700_000_000;
        let t = now + 600;
        assert_eq!(v.verify(t, Some(&sign("old", t)), now), Ok(()));
        assert_eq!(v.verify(t, Some(&sign("new", t)), now), Ok(()));
        assert_eq!(
            v.verify(t, Some(&sign("new", t).to_uppercase()), now),
            Ok(())
        );
        assert_eq!(
            v.verify(t, Some(&sign("other", t)), now),
            Err(Rejection::BadSignature)
        );
        assert_eq!(v.verify(t, None, now), Err(Rejection::BadSignature));
        assert_eq!(v.verify(t, Some(""), now), Err(Rejection::BadSignature));
        assert_eq!(
            v.verify(t, Some(&format!(" {} ", sign("old", t))), now),
            Ok(())
        );
        let good = sign("old", t);
        for bad in [&good[1..], &format!("{good}0"), &format!("z{}", &good[1..])] {
            assert_eq!(v.verify(t, Some(bad), now), Err(Rejection::BadSignature));
        }
        // A sign for another t does not carry over.
        assert_eq!(
            v.verify(t, Some(&sign("new", t + 1)), now),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn t_window_has_skew_behind_and_validity_ahead() {
        let v = verifier("k");
        let now = 1_700_000_000;
        let check = |t: i64| v.verify(t, Some(&sign("k", t)), now);
        assert_eq!(check(now - 60), Ok(()));
        assert_eq!(check(now - 61), Err(Rejection::Expired));
        assert_eq!(check(now + 900), Ok(()));
        assert_eq!(check(now + 901), Err(Rejection::TooFarAhead));
        assert_eq!(check(i64::MIN), Err(Rejection::Expired));
        assert_eq!(check(i64::MAX), Err(Rejection::TooFarAhead));
    }

    #[test]
    fn insecure_mode_skips_the_sign_but_not_the_window() {
        let v = Verifier::new(None, 60, 900);
        let now = 1_700_000_000;
        assert_eq!(v.verify(now, None, now), Ok(()));
        assert_eq!(v.verify(now - 3600, None, now), Err(Rejection::Expired));
    }

    #[test]
    fn keys_parse_from_list_and_never_print() {
        let keys = Keys::from_list(" s3cretA ,, s3cretB,");
        assert_eq!(keys.0, vec!["s3cretA", "s3cretB"]);
        assert!(!format!("{keys:?}").contains("s3cret"));
    }
}
