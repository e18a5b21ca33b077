//! `tessera certs`: a CA and the certificates of servers, agents and users (rcgen). Everything
//! lands in one directory (default `./tessera-certs`): `ca.pem`, `ca-key.pem`, and
//! `<stem>.pem` / `<stem>-key.pem` per certificate; keys are written 0600. The identity goes in
//! the certificate as a `tessera://` URI (see `docs/security.md`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use tessera_core::acl::{Principal, Role};
use tessera_tls::issue::{Ca, write_file, write_pair};

use super::{EXIT_FAILED, EXIT_INVALID};

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory holding the CA and the certificates.
    #[arg(long, global = true, default_value = "tessera-certs", env = "TESSERA_CERTS_DIR")]
    dir: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, global = true, default_value_t = 365)]
    days: u32,
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a CA (ca.pem, ca-key.pem). Refuses to overwrite one unless --force.
    Ca {
        /// The CA's name.
        #[arg(long, default_value = "Tessera CA")]
        name: String,
        /// Replace an existing CA (rotation: keep the old ca.pem in the servers' bundle
        /// until every certificate is reissued).
        #[arg(long)]
        force: bool,
    },
    /// A server's certificate (server-ID.pem): serves clients and speaks Raft.
    Server {
        /// Server id.
        id: u64,
        /// DNS names and IP addresses clients dial it at (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
    /// An agent's certificate (agent-NODE.pem): registers that node only.
    Agent {
        /// The node name the agent registers.
        node: String,
    },
    /// A user's certificate (user-NAME.pem), with a role; without one it needs a token.
    User {
        /// User name.
        name: String,
        /// admin, operator, submitter or viewer.
        #[arg(long)]
        role: Option<String>,
        /// A tenant a submitter acts for (repeatable).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Concatenate CA certificates into one bundle (rotation: old and new CA together).
    Bundle {
        /// The bundle to write.
        #[arg(long)]
        out: PathBuf,
        /// CA certificates (PEM).
        #[arg(required = true)]
        cas: Vec<PathBuf>,
    },
}

fn fail(code: u8, m: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {m}");
    ExitCode::from(code)
}

/// Run `tessera certs`.
pub fn run(args: CertsArgs) -> ExitCode {
    let dir = args.dir;
    let (who, stem, hosts) = match args.command {
        CertsCommand::Ca { name, force } => {
            if dir.join("ca-key.pem").exists() && !force {
                return fail(EXIT_INVALID, format!("{} already holds a CA; --force replaces it", dir.display()));
            }
            return match Ca::create(&name, args.days.max(1)).and_then(|(_, f)| write_pair(&dir, "ca", &f)) {
                Ok((cert, key)) => {
                    println!("wrote {} and {} (0600)", cert.display(), key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_FAILED, e),
            };
        }
        CertsCommand::Bundle { out, cas } => {
            let mut bundle = String::new();
            for c in &cas {
                match std::fs::read_to_string(c) {
                    Ok(t) if t.contains("BEGIN CERTIFICATE") => bundle.push_str(&t),
                    Ok(_) => return fail(EXIT_INVALID, format!("{}: not a PEM certificate", c.display())),
                    Err(e) => return fail(EXIT_FAILED, format!("{}: {e}", c.display())),
                }
            }
            return match write_file(&out, &bundle, 0o644) {
                Ok(()) => {
                    println!("wrote {} ({} CAs)", out.display(), cas.len());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_FAILED, e),
            };
        }
        CertsCommand::Server { id, hosts } => (Principal::Server { id }, format!("server-{id}"), hosts),
        CertsCommand::Agent { node } => (Principal::Agent { node: node.clone() }, format!("agent-{node}"), vec![]),
        CertsCommand::User { name, role, tenants } => {
            let role = match role.map(|r| r.parse::<Role>()).transpose() {
                Ok(r) => r,
                Err(m) => return fail(EXIT_INVALID, format!("--role: {m}")),
            };
            let tenants: BTreeSet<String> = tenants.into_iter().collect();
            (Principal::User { name: name.clone(), role, tenants, token: None }, format!("user-{name}"), vec![])
        }
    };
    let ca = match Ca::load_dir(&dir) {
        Ok(ca) => ca,
        Err(e) => {
            return fail(EXIT_FAILED, format!("{e} (create the CA first: tessera certs ca --dir {})", dir.display()));
        }
    };
    let issued = match ca.issue(&who, &hosts, args.days.max(1)) {
        Ok(i) => i,
        Err(e) => return fail(EXIT_INVALID, e),
    };
    match write_pair(&dir, &stem, &issued) {
        Ok((cert, key)) => {
            println!("wrote {} and {} (0600) for {}", cert.display(), key.display(), who.audit_name());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILED, e),
    }
}
