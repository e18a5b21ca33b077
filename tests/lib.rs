//! Helpers for Tessera's integration tests: finding (and if needed building) the `tessera`
//! binary, running it, and cleaning up after it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of the `tessera` binary of this workspace, built on first use if missing.
pub fn tessera_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // The test executable lives in target/<profile>/deps/; the binary in target/<profile>/.
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(|d| d.parent()).expect("target profile directory").to_path_buf();
        let bin = dir.join(format!("tessera{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "tessera", "--bin", "tessera"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build -p tessera failed");
        }
        bin
    })
    .clone()
}

/// Run `tessera ARGS` to completion.
pub fn tessera(args: &[&str]) -> Output {
    Command::new(tessera_bin()).args(args).output().expect("run tessera")
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}
