//! AFL target: `sai_fuzz::handshake`.
fn main() {
    afl::fuzz!(|data: &[u8]| sai_fuzz::handshake(data));
}
