//! AFL target: `sai_fuzz::bitmap`.
fn main() {
    afl::fuzz!(|data: &[u8]| sai_fuzz::bitmap(data));
}
