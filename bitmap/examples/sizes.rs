//! Prints the serialized size of sai-bitmap and roaring (portable format) for every benchmark
//! dataset, as a Markdown table: `cargo run --release -p sai-bitmap --example sizes`.

use roaring::RoaringBitmap;
use sai_bitmap::Bitmap;

#[path = "../benches/datasets.rs"]
mod datasets;

fn main() {
    println!("| dataset | members read | sai-bitmap bytes | roaring bytes | sai / roaring |");
    println!("|---|---:|---:|---:|---:|");
    let mut worst: f64 = 0.0;
    for d in datasets::all() {
        let ours: Bitmap = d.readers.iter().copied().collect();
        let theirs: RoaringBitmap = d.readers.iter().copied().collect();
        let a = ours.serialize().len();
        let b = theirs.serialized_size();
        let r = a as f64 / b as f64;
        worst = worst.max(r);
        println!("| {} | {} | {a} | {b} | {r:.2} |", d.name, d.readers.len());
    }
    println!("\nLargest ratio: {worst:.2} (must be <= 1.00)");
}
