//! Compiles `proto/pipeline.proto` with the vendored protoc (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/pipeline.proto");
    tonic_prost_build::configure().compile_protos(&["proto/pipeline.proto"], &["proto"])?;
    Ok(())
}
