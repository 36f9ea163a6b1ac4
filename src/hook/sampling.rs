//! Deterministic sampling, the same choice in every process, engine and
//! version: the README's definition, pinned by golden values.

/// `sample(value, fraction)`: true for a deterministic `fraction` of values.
/// The value's text is hashed with 64-bit FNV-1a, mixed with MurmurHash3's
/// 64-bit finaliser (FNV alone spreads short, similar keys such as offsets
/// badly), and kept when the top 53 bits, as a fraction of 2^53, are below
/// `fraction`; so a replay, another instance or another language makes the
/// same choice.
pub fn sample(value: &str, fraction: f64) -> bool {
    sample_bytes(value.as_bytes(), fraction)
}

/// [`sample`] of a value's text given as bytes.
pub fn sample_bytes(value: &[u8], fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    if fraction <= 0.0 || fraction.is_nan() {
        return false;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in value {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_deterministic_and_close_to_the_fraction() {
        let kept = (0..100_000).filter(|i| sample(&i.to_string(), 0.1)).count();
        assert!((9_500..10_500).contains(&kept), "{kept}");
        for start in [0, 1_000_000, 1_095_578_115_815_010_000u64] {
            let kept = (start..start + 2_000)
                .filter(|i| sample(&i.to_string(), 0.1))
                .count();
            assert!((150..250).contains(&kept), "from {start}: {kept}");
        }
        assert!(sample("x", 1.0));
        assert!(!sample("x", 0.0));
    }

    #[test]
    fn sampling_makes_the_same_choice_as_an_independent_implementation() {
        // The point each value hashes to, computed by a separate Python
        // implementation of FNV-1a 64 + fmix64 (the README's definition):
        // a change of algorithm, constants or text form changes the choice
        // other processes, engines and versions make, and fails here.
        for (value, point) in [
            ("1095578115815010005", 0.493_968_385_794_983_7),
            ("0", 0.757_387_813_305_282_6),
            ("1", 0.485_232_524_079_154_4),
            ("ZTF21aaaaaaa", 0.644_672_210_471_941_7),
            ("true", 0.292_628_424_352_558_65),
            ("2.5", 0.056_238_630_079_538_33),
            ("", 0.936_769_448_390_44),
        ] {
            assert!(sample(value, point + 1e-9), "{value:?} kept above {point}");
            assert!(
                !sample(value, point - 1e-9),
                "{value:?} dropped below {point}"
            );
        }
    }
}
