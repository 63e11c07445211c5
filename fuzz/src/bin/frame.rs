//! AFL target: `sai_fuzz::frame`.
fn main() {
    afl::fuzz!(|data: &[u8]| sai_fuzz::frame(data));
}
