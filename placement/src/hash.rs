//! Hashing primitives: user and message keys, the 64-bit mixers behind
//! rendezvous scores, and a logarithm that gives the same bits on every
//! machine.
//!
//! Everything here is deterministic across platforms: blake3 is specified
//! bit for bit, the mixers are integer arithmetic, and [`exp1`] uses integer
//! operations, a table the compiler evaluates, and IEEE-754 `+ - *`
//! (correctly rounded everywhere Rust runs without x87 extended precision).
//! Never the platform `libm`, whose `ln` may differ in the last bit between
//! C libraries and would let two nodes disagree on a near-tie.

use serde::{Deserialize, Serialize};

/// The 64-bit hash of a normalized user address: the first 8 bytes
/// (little-endian) of `blake3(normalized address)`.
///
/// Every placement question about a user takes this key, so a caller that
/// asks several questions (or asks at a high rate) hashes the address once;
/// blake3 of a ~20-byte address costs more than the table lookup itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserKey(pub u64);

impl UserKey {
    /// Key of an address that is already normalized (see [`normalize_user`]).
    pub fn from_normalized(normalized: &str) -> UserKey {
        UserKey(blake3_u64(normalized.as_bytes()))
    }

    /// Key of a raw address: [`normalize_user`] then blake3. An address
    /// whose domain is already lower case (the directory's form) is hashed
    /// in place, without building a normalized copy.
    pub fn from_address(addr: &str) -> UserKey {
        let needs_folding = addr
            .rfind('@')
            .is_some_and(|at| addr[at..].bytes().any(|b| b.is_ascii_uppercase()));
        if needs_folding {
            UserKey::from_normalized(&normalize_user(addr))
        } else {
            UserKey::from_normalized(addr)
        }
    }
}

/// The 64-bit hash of a message identifier, used to make repair choices
/// deterministic per message: the first 8 bytes of `blake3(message id)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageKey(pub u64);

impl MessageKey {
    /// Key of a message identifier (any stable byte string the store uses).
    pub fn from_id(id: &[u8]) -> MessageKey {
        MessageKey(blake3_u64(id))
    }
}

/// Normalizes a user address for placement: the domain (the part after the
/// last `@`) is ASCII-lower-cased; the local part is kept byte for byte, as
/// the directory stores it. An address without `@` is returned unchanged.
///
/// Only ASCII letters are folded: Unicode case tables change between Rust
/// releases, and two nodes built with different compilers must still agree.
/// Internationalized domains should reach here as A-labels (`xn--…`).
pub fn normalize_user(addr: &str) -> String {
    match addr.rfind('@') {
        Some(at) => {
            let (local, domain) = addr.split_at(at);
            let mut out = String::with_capacity(addr.len());
            out.push_str(local);
            out.push_str(&domain.to_ascii_lowercase());
            out
        }
        None => addr.to_owned(),
    }
}

/// First 8 bytes of blake3, little-endian.
pub(crate) fn blake3_u64(bytes: &[u8]) -> u64 {
    let hash = blake3::hash(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Domain-separation prefix for node seeds, so a node id can never collide
/// with a user address of the same bytes.
const NODE_SEED_CONTEXT: &[u8] = b"quill/placement/node-seed/v1\0";

/// Per-node 64-bit seed, `blake3(context || id)`; computed once per view
/// build, so sequential ids still get unrelated seeds.
pub(crate) fn node_seed(id: u64) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(NODE_SEED_CONTEXT);
    hasher.update(&id.to_le_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Golden-ratio increment of splitmix64.
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 / murmur3 finalizer: a bijection on `u64` whose output bits
/// each depend on every input bit.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: the next output of a generator whose whole state is `state`.
#[inline]
pub(crate) fn splitmix_next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(SPLITMIX_GAMMA);
    mix64(*state)
}

/// Bits of a stream output that feed an exponential variate: an `f64`
/// mantissa's worth, so the uniform they encode is exact.
pub(crate) const EXP_INPUT_BITS: u32 = 53;

/// log2 of the cells in [`LN1P_TABLE`]: 256 cells keep linear interpolation
/// within 2e-6 of `ln(1 + f)` (error ≤ h²/8 for cell width h).
const LN1P_CELL_BITS: u32 = 8;
const LN1P_CELLS: usize = 1 << LN1P_CELL_BITS;

/// `ln(1 + i / 256)` for `i` in `0..=256`, evaluated by the compiler's const
/// evaluator (exact IEEE arithmetic, no `libm`), so it is the same table in
/// every build on every platform.
static LN1P_TABLE: [f64; LN1P_CELLS + 1] = ln1p_table();

/// `ln(m)` for `m` in `[1, 2]` by the atanh series, `+ - * /` only.
const fn ln_1_to_2(m: f64) -> f64 {
    // s <= 1/3, so s^(2k+1) / (2k+1) < 1e-17 well before k = 20.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut k = 0;
    while k < 20 {
        sum += term / (2 * k + 1) as f64;
        term *= s2;
        k += 1;
    }
    2.0 * sum
}

const fn ln1p_table() -> [f64; LN1P_CELLS + 1] {
    let mut table = [0.0; LN1P_CELLS + 1];
    let mut i = 0;
    while i <= LN1P_CELLS {
        table[i] = ln_1_to_2(1.0 + i as f64 / LN1P_CELLS as f64);
        i += 1;
    }
    table
}

/// `ln 2`, correctly rounded.
const LN_2: f64 = std::f64::consts::LN_2;

/// An `Exp(1)` variate from the low [`EXP_INPUT_BITS`] bits of `x`:
/// `-ln(u)` with `u = (low bits + 1) / 2^53` in `(0, 1]`, so it is finite
/// and `u = 1` gives exactly 0.
///
/// Integer operations, one table lookup and IEEE `+ - *` only, so every node
/// computes the same bits (see the module doc). Absolute error ≤ 2e-6, far
/// below what could bias a race between nodes; what matters is that it is
/// non-decreasing in `u` and identical everywhere. Branch-free and division
/// free on purpose: the table build calls it ~35 M times.
#[inline]
pub(crate) fn exp1(x: u64) -> f64 {
    let v = (x & ((1u64 << EXP_INPUT_BITS) - 1)) + 1; // 1 ..= 2^53
    // v = 2^(63 - lz) (1 + f), so -ln(v / 2^53) = (lz - 10) ln 2 - ln(1 + f).
    let lz = v.leading_zeros();
    let frac = (v << lz) << 1; // f as a 0.64 fixed-point fraction
    let cell = (frac >> (64 - LN1P_CELL_BITS)) as usize;
    // Position within the cell, 53 bits, converted through i64 (one
    // instruction; the u64 conversion is a sequence).
    let within =
        ((frac << LN1P_CELL_BITS) >> (64 - EXP_INPUT_BITS)) as i64 as f64 * (1.0 / (1u64 << EXP_INPUT_BITS) as f64);
    let lo = LN1P_TABLE[cell];
    let hi = LN1P_TABLE[cell + 1];
    let ln_1pf = lo + (hi - lo) * within;
    f64::from(lz as i32 - (64 - EXP_INPUT_BITS as i32 - 1)) * LN_2 - ln_1pf
}

/// Weighted rendezvous score of `(key, node)`: `-ln(u) / weight` with `u`
/// uniform from `mix64(key ^ seed)`. Lower is better; the minimum over nodes
/// picks each node with probability `weight / total weight` (the minimum of
/// independent exponentials), and removing or adding a node only moves keys
/// from or to that node.
#[inline]
pub(crate) fn rendezvous_score(key: u64, seed: u64, inv_weight: f64) -> f64 {
    exp1(mix64(key ^ seed)) * inv_weight
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp1_matches_std_closely_and_is_monotone() {
        let mut state = 7u64;
        for _ in 0..100_000 {
            let x = splitmix_next(&mut state);
            let u = ((x & ((1u64 << 53) - 1)) + 1) as f64 / (1u64 << 53) as f64;
            let ours = exp1(x);
            let std = -u.ln();
            assert!((ours - std).abs() <= 2e-6, "u={u} ours={ours} std={std}");
            // The next representable input never gives a larger variate.
            assert!(exp1(x.wrapping_add(1) & ((1 << 53) - 1)) <= ours || x & ((1 << 53) - 1) == (1 << 53) - 1);
        }
        assert_eq!(exp1((1 << 53) - 1), 0.0);
        assert!((exp1(0) - 53.0 * LN_2).abs() < 1e-12);
        for (i, v) in LN1P_TABLE.iter().enumerate() {
            assert!((v - (1.0 + i as f64 / 256.0).ln()).abs() < 1e-15);
        }
    }

    #[test]
    fn normalize_lowercases_domain_only() {
        assert_eq!(normalize_user("Alice.Smith@Example.COM"), "Alice.Smith@example.com");
        assert_eq!(normalize_user("a@b@Example.Org"), "a@b@example.org");
        assert_eq!(normalize_user("NoDomain"), "NoDomain");
        // Only ASCII folds: the non-ASCII capital stays as it is.
        assert_eq!(normalize_user("x@ÉCOLE.fr"), "x@École.fr");
        assert_eq!(
            UserKey::from_address("bob@EXAMPLE.com"),
            UserKey::from_normalized("bob@example.com")
        );
        assert_ne!(
            UserKey::from_address("Bob@example.com"),
            UserKey::from_address("bob@example.com")
        );
    }

    #[test]
    fn keys_are_stable() {
        // Pinned: a change here changes every user's placement cluster-wide.
        // blake3("") = af1349b9f5f9a1a6..., read little-endian.
        assert_eq!(blake3_u64(b""), 0xa6a1_f9f5_b949_13af);
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
    }
}
