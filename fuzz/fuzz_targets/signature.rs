//! Any key list, `t`, `sign` and clock: `sign` is 32 lowercase hex characters, the verifier never
//! panics and decides exactly as the rule says: the sign of `t` under one of the keys, then
//! `now - skew <= t <= now + validity` (saturating at the ends of i64).

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tencent_css_exporter::signature::{sign, Keys, Rejection, Verifier};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    keys: &'a str,
    t: i64,
    sign: Option<&'a str>,
    now: i64,
    skew: i64,
    validity: i64,
    /// Which key to sign with (if any), and whether to send it in upper case.
    signer: Option<(u8, bool)>,
}

fn clamp(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

fuzz_target!(|input: Input| {
    // The keys as the list form defines them: comma-separated, trimmed, empty ones dropped.
    let keys: Vec<&str> = input
        .keys
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    let signs: Vec<String> = keys.iter().map(|k| sign(k, input.t)).collect();
    for s in &signs {
        assert_eq!(s.len(), 32);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    let candidate: Option<String> = match input.signer {
        Some((i, upper)) if !signs.is_empty() => {
            let s = signs[i as usize % signs.len()].clone();
            Some(if upper { s.to_uppercase() } else { s })
        }
        _ => input.sign.map(str::to_owned),
    };
    let verifier = Verifier::new(
        Some(Keys::from_list(input.keys)),
        input.skew,
        input.validity,
    );
    let result = verifier.verify(input.t, candidate.as_deref(), input.now);

    let signed = candidate
        .as_deref()
        .map(|c| c.trim().to_ascii_lowercase())
        .is_some_and(|c| signs.contains(&c));
    let earliest = clamp(input.now as i128 - input.skew as i128);
    let latest = clamp(input.now as i128 + input.validity as i128);
    let expected = if !signed {
        Err(Rejection::BadSignature)
    } else if input.t < earliest {
        Err(Rejection::Expired)
    } else if input.t > latest {
        Err(Rejection::TooFarAhead)
    } else {
        Ok(())
    };
    assert_eq!(result, expected, "keys {keys:?}, sign {candidate:?}");

    // Without keys only the window counts.
    let insecure = Verifier::new(None, input.skew, input.validity);
    let expected = match expected {
        Err(Rejection::BadSignature) if input.t < earliest => Err(Rejection::Expired),
        Err(Rejection::BadSignature) if input.t > latest => Err(Rejection::TooFarAhead),
        Err(Rejection::BadSignature) => Ok(()),
        other => other,
    };
    assert_eq!(
        insecure.verify(input.t, candidate.as_deref(), input.now),
        expected
    );
});
