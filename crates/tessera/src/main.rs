//! The `tessera` binary: one executable for servers, agents, researchers and operators, like
//! `nomad` or `consul`. Today it carries `spec check`; the server, agent, job, node and cluster
//! subcommands arrive with their issues.
//!
//! Exit codes scripts can rely on: 0 success, 1 an operation failed, 2 invalid input (a bad
//! flag or an invalid spec).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Tessera: a multi-cloud GPU job scheduler.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work with job spec files.
    #[command(subcommand)]
    Spec(SpecCommand),
}

#[derive(Subcommand, Debug)]
enum SpecCommand {
    /// Check a TOML job spec and print it with every default filled in.
    ///
    /// Problems are printed with the field and line they concern; the exit code is 2.
    Check {
        /// The spec file.
        file: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Output {
    /// Readable text.
    Table,
    /// JSON, one document.
    Json,
}

const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Spec(SpecCommand::Check { file, output }) => spec_check(&file, output),
    }
}

fn spec_check(file: &PathBuf, output: Output) -> ExitCode {
    let src = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match tessera_core::spec::parse_toml(&src) {
        Ok(spec) => {
            match output {
                Output::Json => match serde_json::to_string_pretty(&spec) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_FAILED);
                    }
                },
                Output::Table => print_spec(&spec),
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}: {err}", file.display());
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn print_spec(s: &tessera_core::JobSpec) {
    let r = &s.resources;
    let p = &s.placement;
    let list = |v: &[String]| if v.is_empty() { "any".to_string() } else { v.join(",") };
    println!("name:           {}", s.name);
    println!("tenant:         {}", s.tenant);
    println!("command:        {}", s.command.join(" "));
    println!("shards:         {} x {} GPU ({} GPUs in all)", s.shards, r.gpus, s.total_gpus());
    println!("gpu model:      {}", r.gpu_model.as_deref().unwrap_or("any"));
    println!("gpu memory:     >= {} GiB", r.min_gpu_memory_mib / 1024);
    println!("cpu / memory:   {} cores / {} GiB per shard", r.cpu_millis as f64 / 1000.0, r.memory_mib / 1024);
    println!("clouds:         {}", list(&p.clouds.iter().map(|c| c.to_string()).collect::<Vec<_>>()));
    println!("regions:        {}", list(&p.regions));
    println!("spot:           {}", p.spot.as_str());
    println!("span:           regions {}, clouds {}", p.span_regions, p.span_clouds);
    println!("priority:       {}", s.priority);
    println!("max runtime:    {}", s.max_runtime_secs.map_or("none".into(), |r| format!("{r} s")));
    println!("checkpoint dir: {}", s.checkpoint_dir.as_deref().unwrap_or("none"));
    println!(
        "retry:          {} attempts, {} s backoff, never on {:?}",
        s.retry.max_attempts, s.retry.backoff_secs, s.retry.never_retry_exit_codes
    );
    println!(
        "stop:           {}, {} s, SIGTERM, {} s, SIGKILL",
        s.stop.signal, s.stop.checkpoint_grace_secs, s.stop.term_grace_secs
    );
}
