//! The researcher and operator commands of `tessera`: `job`, `node`, `cluster` and
//! `completions`. They are gRPC clients of the public API (`proto/tessera/v1/`).
//!
//! # Reaching the servers
//!
//! `--server` takes one or more `HOST:PORT` addresses, comma-separated or repeated; without it
//! the `TESSERA_SERVER` environment variable is read (same syntax), and without that the
//! servers of the README's local cluster, `127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003`. Each
//! request goes to the first address that answers: an address that refuses the connection, does
//! not answer within the timeout, or answers UNAVAILABLE (no leader right now, leader
//! unreachable) is skipped for the next one. When none answers, the error lists every address
//! with the reason: `could not reach any server: 127.0.0.1:1 (connection refused), ...`.
//! Streams (`job watch`, `job logs -f`) that break reconnect through the same list and carry on
//! where they were.
//!
//! Exit codes (0 success, 1 failed, 2 invalid input, 3 not found) and the JSON shapes of
//! `-o json` are documented for users in `docs/cli.md`; keep it true with every change here.

pub mod acl;
pub mod certs;
pub mod cluster;
pub mod connect;
pub mod job;
pub mod node;
pub mod output;
pub mod tenant;
pub mod usage;

use std::process::ExitCode;

/// Exit code: the operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: invalid input.
pub const EXIT_INVALID: u8 = 2;
/// Exit code: the job, node, GPU or server named does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;

/// The `after_help` of the client commands.
pub const CLIENT_AFTER_HELP: &str = "\
Servers: --server HOST:PORT[,HOST:PORT...] (repeatable), else $TESSERA_SERVER, else
127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003; each is tried in turn until one answers.
TLS: --ca/--cert/--key (or $TESSERA_CA, $TESSERA_CERT, $TESSERA_KEY); --token or $TESSERA_TOKEN
adds an ACL token; --insecure for servers started with --insecure.

Exit codes: 0 success; 1 the operation failed (server error, no server reachable, or for
watch: the job failed or was cancelled); 2 invalid input (bad flag, invalid spec, request
refused as invalid); 3 not found (no such job, node, GPU or server).

-o json prints stable JSON (fields may be added, never renamed); see each command's --help.";

/// The `after_help` of `tessera` itself.
pub const EXIT_CODES_HELP: &str = "\
Exit codes: 0 success; 1 the operation failed; 2 invalid input (bad flag, invalid spec);
3 not found (no such job, node, GPU or server).";

/// Options every client command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientOpts {
    /// Scheduler servers, HOST:PORT, comma-separated or repeated; tried in turn until one
    /// answers [default: 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003]
    #[arg(long, short = 's', env = "TESSERA_SERVER", value_delimiter = ',', global = true, value_name = "ADDR")]
    pub server: Vec<String>,
    /// Output format: readable text (table) or stable JSON (json).
    #[arg(long, short = 'o', value_enum, default_value_t = output::Format::Table, global = true)]
    pub output: output::Format,
    /// CA bundle (PEM) the servers' certificates must chain to.
    #[arg(long, env = "TESSERA_CA", global = true, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Your certificate (PEM), from `tessera certs user`.
    #[arg(long, env = "TESSERA_CERT", global = true, value_name = "FILE")]
    pub cert: Option<std::path::PathBuf>,
    /// Your certificate's private key (PEM).
    #[arg(long, env = "TESSERA_KEY", global = true, value_name = "FILE")]
    pub key: Option<std::path::PathBuf>,
    /// ACL token secret, sent as `authorization: Bearer ...`; it decides what you may do.
    #[arg(long, env = "TESSERA_TOKEN", global = true, value_name = "SECRET", hide_env_values = true)]
    pub token: Option<String>,
    /// Talk to servers started with --insecure (plain TCP, no certificates).
    #[arg(long, env = "TESSERA_INSECURE", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

/// Why a client command did not succeed; each maps to one exit code.
#[derive(Debug)]
pub enum CliError {
    /// Bad input: exit 2.
    Invalid(String),
    /// No such thing: exit 3.
    NotFound(String),
    /// The operation failed: exit 1.
    Failed(String),
    /// Stop quietly with this code (stdout was closed by the reader, for example).
    Quiet(u8),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Invalid(_) => EXIT_INVALID,
            CliError::NotFound(_) => EXIT_NOT_FOUND,
            CliError::Failed(_) => EXIT_FAILED,
            CliError::Quiet(c) => *c,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Invalid(m) | CliError::NotFound(m) | CliError::Failed(m) => f.write_str(m),
            CliError::Quiet(_) => Ok(()),
        }
    }
}

/// A command's result: the exit code it chose (0, or 1 for a watched job that failed).
pub type CliResult = Result<u8, CliError>;

/// Run a client command on a fresh single-threaded runtime and turn its result into an exit
/// code, printing the error (never a panic, never a Debug dump) on stderr.
pub fn run<F>(fut: F) -> ExitCode
where
    F: std::future::Future<Output = CliResult>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => ExitCode::from(code),
        Err(CliError::Quiet(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `tessera completions SHELL`: the completion script for `cmd` on stdout.
pub fn completions(shell: clap_complete::Shell, mut cmd: clap::Command) -> ExitCode {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "tessera", &mut buf);
    match output::write_stdout(&buf) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(e.exit_code()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_documented_exit_code() {
        assert_eq!(CliError::Invalid("x".into()).exit_code(), 2);
        assert_eq!(CliError::NotFound("x".into()).exit_code(), 3);
        assert_eq!(CliError::Failed("x".into()).exit_code(), 1);
        assert_eq!(CliError::Quiet(0).exit_code(), 0);
    }
}
