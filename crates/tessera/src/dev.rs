//! `tessera dev`: a whole cluster in one process on loopback, like `nomad agent -dev`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Flags of `tessera dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Keep the servers' and agents' data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Submit a gang job running the example trainer, kill one agent half way, show the shard
    /// resume from its checkpoint on another node, and exit 0 when the job succeeds.
    #[arg(long)]
    pub demo: bool,
}

/// Run `tessera dev`.
pub fn run(_args: DevArgs) -> ExitCode {
    eprintln!("tessera dev: not built yet");
    ExitCode::from(1)
}
