//! Compiles `proto/sai.proto` with the protoc binary vendored by `protoc-bin-vendored`, so the
//! build needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/sai.proto");
    tonic_prost_build::configure().compile_protos(&["proto/sai.proto"], &["proto"])?;
    Ok(())
}
