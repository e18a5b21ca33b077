//! Generates the Rust code of Tessera's public gRPC API from `proto/tessera/v1/*.proto`, with the
//! protoc shipped by `protoc-bin-vendored` so that a fresh machine needs no manual install. Also
//! writes the file descriptor set served by gRPC reflection.

use std::error::Error;
use std::path::PathBuf;

/// The proto files, relative to this crate; `../../proto` is the include root.
const PROTOS: &[&str] = &[
    "../../proto/tessera/v1/common.proto",
    "../../proto/tessera/v1/jobs.proto",
    "../../proto/tessera/v1/nodes.proto",
    "../../proto/tessera/v1/cluster.proto",
    "../../proto/tessera/v1/agent.proto",
    "../../proto/tessera/v1/raft.proto",
    "../../proto/tessera/v1/acl.proto",
    "../../proto/tessera/v1/tenants.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.file_descriptor_set_path(out_dir.join("tessera_descriptor.bin"));
    // Ordered maps, as in tessera-core: conversions copy them as they are, and encoding is
    // deterministic.
    config.btree_map(["."]);

    tonic_prost_build::configure().build_server(true).build_client(true).compile_with_config(
        config,
        PROTOS,
        &["../../proto"],
    )?;
    Ok(())
}
