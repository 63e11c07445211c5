//! Seeded read-receipt datasets: group sizes 10, 200, 2,000, 50,000; read fractions 1%, 50%,
//! 99%; readers in slot order or in a seeded random order.
#![allow(dead_code)]

/// One dataset: a group size and the slots of the members who read the message.
pub struct Dataset {
    /// `<size>-<fraction>-<order>`.
    pub name: String,
    /// Group size.
    pub size: u32,
    /// Readers' slots, in the order they read.
    pub readers: Vec<u32>,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The seeded datasets, shared by the benchmark and `examples/sizes.rs`.
pub fn all() -> Vec<Dataset> {
    let mut out = Vec::new();
    for size in [10u32, 200, 2_000, 50_000] {
        for (fname, f) in [("1pct", 0.01), ("50pct", 0.5), ("99pct", 0.99)] {
            for order in ["inorder", "random"] {
                let k = ((f64::from(size) * f).round() as usize).max(1);
                let mut seed = 0x5EED ^ u64::from(size) ^ (k as u64) << 20;
                let mut slots: Vec<u32> = (0..size).collect();
                // Random order: a seeded shuffle, then the first k are the readers.
                if order == "random" {
                    for i in (1..slots.len()).rev() {
                        let j = (xorshift(&mut seed) % (i as u64 + 1)) as usize;
                        slots.swap(i, j);
                    }
                }
                slots.truncate(k);
                out.push(Dataset {
                    name: format!("{size}-{fname}-{order}"),
                    size,
                    readers: slots,
                });
            }
        }
    }
    out
}
