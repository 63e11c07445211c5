//! AFL target: `sai_fuzz::im`.
fn main() {
    afl::fuzz!(|data: &[u8]| sai_fuzz::im(data));
}
