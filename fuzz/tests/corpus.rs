//! Every committed corpus entry through its target, without AFL: `cargo test` here replays the
//! corpora (and any crash found later and added to them) as regression tests.

fn replay(target: &str, body: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        if path.is_file() {
            body(&std::fs::read(&path).expect("read corpus entry"));
            n += 1;
        }
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}

#[test]
fn frame() {
    replay("frame", sai_fuzz::frame);
}

#[test]
fn handshake() {
    replay("handshake", sai_fuzz::handshake);
}

#[test]
fn im() {
    replay("im", sai_fuzz::im);
}

#[test]
fn bitmap() {
    replay("bitmap", sai_fuzz::bitmap);
}

/// Writes the bitmap seeds (run once with `--ignored`; the output is committed).
#[test]
#[ignore]
fn write_bitmap_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/bitmap");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let sets: [(&str, Vec<u32>); 5] = [
        ("empty", vec![]),
        ("small", vec![0, 1, 2, 7, 100]),
        ("dense", (0..5000).collect()),
        ("runs", (0..3).flat_map(|i| i * 70_000..i * 70_000 + 3000).collect()),
        ("sparse", (0..200).map(|i| i * 65_537).collect()),
    ];
    for (name, set) in sets {
        let b: sai_bitmap::Bitmap = set.into_iter().collect();
        std::fs::write(dir.join(name), b.serialize()).expect("write seed");
    }
}
