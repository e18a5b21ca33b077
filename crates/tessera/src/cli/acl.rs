//! `tessera acl`: bootstrap ACLs and manage tokens (like `nomad acl`).

use clap::Subcommand;
use serde::Serialize;
use tessera_proto::v1;
use tessera_proto::v1::acl_service_client::AclServiceClient;

use super::connect::{Servers, UNARY_TIMEOUT};
use super::output::{self, Format};
use super::{CliError, CliResult, ClientOpts};

#[derive(clap::Args, Debug)]
#[command(after_help = super::CLIENT_AFTER_HELP)]
pub struct AclArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: AclCommand,
}

#[derive(Subcommand, Debug)]
enum AclCommand {
    /// Create the first admin token (once per cluster); prints its secret once.
    Bootstrap,
    /// Manage tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token; prints its secret once.
    Create {
        /// Name, for people and the audit log.
        #[arg(long)]
        name: String,
        /// admin, operator, submitter or viewer.
        #[arg(long)]
        role: String,
        /// A tenant a submitter token acts for (repeatable).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// Lifetime, like 30m, 12h or 90d; default: no expiry.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List tokens (accessors, never secrets).
    List,
    /// Revoke a token by accessor.
    Revoke {
        /// The token's accessor id.
        accessor: String,
    },
}

#[derive(Serialize)]
struct TokenJson {
    accessor: String,
    name: String,
    role: String,
    tenants: Vec<String>,
    created_unix_ms: u64,
    expires_unix_ms: Option<u64>,
    created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

fn token_json(t: v1::AclToken, secret: Option<String>) -> TokenJson {
    TokenJson {
        accessor: t.accessor,
        name: t.name,
        role: t.role,
        tenants: t.tenants,
        created_unix_ms: t.created_unix_ms,
        expires_unix_ms: t.expires_unix_ms,
        created_by: t.created_by,
        secret,
    }
}

fn print_created(r: v1::CreateTokenResponse, out: Format) -> CliResult {
    let t = r.token.unwrap_or_default();
    match out {
        Format::Json => output::json(&token_json(t, Some(r.secret)))?,
        Format::Table => {
            output::line(format!("Accessor: {}", t.accessor))?;
            output::line(format!("Secret:   {}", r.secret))?;
            output::line(format!("Name:     {}", t.name))?;
            output::line(format!("Role:     {}{}", t.role, tenants_suffix(&t.tenants)))?;
            if let Some(e) = t.expires_unix_ms {
                output::line(format!("Expires:  in {}", output::span(e.saturating_sub(output::now_ms()))))?;
            }
            output::line("The secret is shown this once; keep it (export TESSERA_TOKEN=...).")?;
        }
    }
    Ok(0)
}

fn tenants_suffix(t: &[String]) -> String {
    if t.is_empty() { String::new() } else { format!(" of {}", t.join(",")) }
}

/// Run `tessera acl`.
pub async fn run(args: AclArgs) -> CliResult {
    let servers = Servers::from_opts(&args.client)?;
    let out = args.client.output;
    match args.command {
        AclCommand::Bootstrap => {
            let r = servers
                .call(Some(UNARY_TIMEOUT), |ch| async move {
                    Ok(AclServiceClient::new(ch).bootstrap(v1::AclBootstrapRequest::default()).await?.into_inner())
                })
                .await?;
            print_created(r, out)
        }
        AclCommand::Token(TokenCommand::Create { name, role, tenants, ttl }) => {
            let ttl_seconds = match ttl {
                None => 0,
                Some(d) => {
                    tessera_core::spec::parse_duration_secs(&d).map_err(|m| CliError::Invalid(format!("--ttl: {m}")))?
                }
            };
            let req = v1::CreateTokenRequest { name, role, tenants, ttl_seconds };
            let r = servers
                .call(Some(UNARY_TIMEOUT), |ch| {
                    let req = req.clone();
                    async move { Ok(AclServiceClient::new(ch).create_token(req).await?.into_inner()) }
                })
                .await?;
            print_created(r, out)
        }
        AclCommand::Token(TokenCommand::List) => {
            let r = servers
                .call(Some(UNARY_TIMEOUT), |ch| async move {
                    Ok(AclServiceClient::new(ch).list_tokens(v1::ListTokensRequest {}).await?.into_inner())
                })
                .await?;
            match out {
                Format::Json => {
                    output::json(&r.tokens.into_iter().map(|t| token_json(t, None)).collect::<Vec<_>>())?;
                }
                Format::Table => {
                    let mut t = output::table(&["ACCESSOR", "NAME", "ROLE", "EXPIRES", "CREATED BY"]);
                    for k in r.tokens {
                        let expires = k.expires_unix_ms.map_or("never".to_string(), |e| {
                            let now = output::now_ms();
                            if e <= now { "expired".into() } else { format!("in {}", output::span(e - now)) }
                        });
                        t.add_row(vec![
                            k.accessor,
                            k.name,
                            format!("{}{}", k.role, tenants_suffix(&k.tenants)),
                            expires,
                            k.created_by,
                        ]);
                    }
                    output::print_table(&t)?;
                }
            }
            Ok(0)
        }
        AclCommand::Token(TokenCommand::Revoke { accessor }) => {
            let r = servers
                .call(Some(UNARY_TIMEOUT), |ch| {
                    let accessor = accessor.clone();
                    async move {
                        Ok(AclServiceClient::new(ch)
                            .revoke_token(v1::RevokeTokenRequest { accessor })
                            .await?
                            .into_inner())
                    }
                })
                .await?;
            match out {
                Format::Json => output::json(&serde_json::json!({ "accessor": accessor, "index": r.index }))?,
                Format::Table => output::line(format!("token {accessor} revoked"))?,
            }
            Ok(0)
        }
    }
}
