//! Criterion benchmarks live in `benches/benches/`: `codec` (WebSocket frames and IM frames),
//! `gateway` (timer wheel, user index) and `store` (embedded message store). Every dataset is
//! generated from a fixed seed, so runs compare. `cargo bench -p sai-benches` runs them;
//! `cargo bench -p sai-benches -- --test` only checks that they run (CI does that).

/// A deterministic xorshift64* generator for the datasets.
pub struct Seeded(u64);

impl Seeded {
    /// Generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
