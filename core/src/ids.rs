//! Random identifiers: base62 strings from the operating system's CSPRNG.

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` random base62 characters (each carries log2(62) ≈ 5.95 bits).
pub fn random_base62(len: usize) -> String {
    // Rejection sampling keeps every character uniform: 248 = 4 * 62.
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).expect("the operating system's random source failed");
        for &b in &buf {
            if b < 248 && out.len() < len {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// A prefixed random identifier such as `inst_4fQ9…`, for records of the control plane.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_base62(16))
}

/// `prefix_` and 16 base62 digits of `n` (taken modulo 62^16, a bias below 2^-32 for a
/// uniform `n`): a record id derived from a seed rather than drawn (see `store::write`).
pub fn prefixed_base62(prefix: &str, n: u128) -> String {
    const DIGITS: usize = 16;
    let mut n = n % 62u128.pow(DIGITS as u32);
    let mut digits = [b'0'; DIGITS];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    let mut out = String::with_capacity(prefix.len() + 1 + DIGITS);
    out.push_str(prefix);
    out.push('_');
    out.extend(digits.iter().map(|&b| b as char));
    out
}

/// `n` encoded as exactly `width` base62 digits (most significant first), wrapping above 62^width.
pub fn base62_fixed(n: u64, width: usize) -> String {
    let mut out = String::with_capacity(width);
    push_base62(&mut out, n, width);
    out
}

/// Appends `n` as exactly `width` base62 digits to `out`, without allocating.
pub fn push_base62(out: &mut String, mut n: u64, width: usize) {
    // Eleven digits hold any u64; a wider field is zero-padded.
    out.extend(std::iter::repeat_n('0', width.saturating_sub(11)));
    let mut digits = [b'0'; 11];
    let digits = &mut digits[..width.min(11)];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out.extend(digits.iter().map(|b| char::from(*b)));
}

/// True when every byte of `s` is a base62 digit.
pub fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_base62_has_the_asked_length_and_alphabet() {
        let s = random_base62(40);
        assert_eq!(s.len(), 40);
        assert!(is_base62(&s));
        assert_ne!(random_base62(16), random_base62(16));
    }

    #[test]
    fn base62_fixed_pads_and_encodes() {
        assert_eq!(base62_fixed(0, 6), "000000");
        assert_eq!(base62_fixed(61, 2), "0z");
        assert_eq!(base62_fixed(62, 2), "10");
        assert_eq!(base62_fixed(u32::MAX as u64, 6), "4gfFC3");
    }
}
