//! What a certificate says its holder is.
//!
//! The convention (documented in `docs/security.md`): a certificate carries exactly one
//! identity URI among its subject alternative names,
//!
//! - `tessera://server/<id>`: a scheduler server;
//! - `tessera://agent/<node-name>`: the agent of that node;
//! - `tessera://user/<name>`: a person or program;
//!
//! and a user certificate may add its role and tenants, the way a Kubernetes client
//! certificate carries its groups: `tessera://role/<admin|operator|submitter|viewer>` and one
//! `tessera://tenant/<name>` per tenant. A user certificate without a role authenticates its
//! holder but allows nothing until a token says what they may do.

use std::collections::BTreeSet;

use tessera_core::acl::{Principal, Role};

/// The URI scheme of identity SANs.
pub const SCHEME: &str = "tessera://";

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// The SAN URIs that carry `p` in a certificate.
pub fn uris(p: &Principal) -> Result<Vec<String>, String> {
    Ok(match p {
        Principal::Server { id } if *id > 0 => vec![format!("{SCHEME}server/{id}")],
        Principal::Server { .. } => return Err("a server id is at least 1".into()),
        Principal::Agent { node } => {
            if !valid_name(node) {
                return Err(format!("node name '{node}': 1 to 64 letters, digits, '.', '_', '-' or '@'"));
            }
            vec![format!("{SCHEME}agent/{node}")]
        }
        Principal::User { name, role, tenants, .. } => {
            if !valid_name(name) {
                return Err(format!("user name '{name}': 1 to 64 letters, digits, '.', '_', '-' or '@'"));
            }
            if let Some(t) = tenants.iter().find(|t| !valid_name(t)) {
                return Err(format!("tenant '{t}': 1 to 64 letters, digits, '.', '_', '-' or '@'"));
            }
            if !tenants.is_empty() && *role != Some(Role::Submitter) {
                return Err("only a submitter certificate names tenants".into());
            }
            if *role == Some(Role::Submitter) && tenants.is_empty() {
                return Err("a submitter certificate needs at least one --tenant".into());
            }
            let mut v = vec![format!("{SCHEME}user/{name}")];
            v.extend(role.map(|r| format!("{SCHEME}role/{r}")));
            v.extend(tenants.iter().map(|t| format!("{SCHEME}tenant/{t}")));
            v
        }
        Principal::Insecure => return Err("an insecure principal has no certificate".into()),
    })
}

/// The principal that a certificate's SAN URIs describe (other URIs are ignored).
pub fn from_uris<'a>(list: impl IntoIterator<Item = &'a str>) -> Result<Principal, String> {
    let mut who: Option<Principal> = None;
    let mut role = None;
    let mut tenants = BTreeSet::new();
    for uri in list {
        let Some(rest) = uri.strip_prefix(SCHEME) else { continue };
        let Some((kind, value)) = rest.split_once('/') else {
            return Err(format!("identity URI '{uri}' has no value"));
        };
        let found = match kind {
            "server" => Principal::Server {
                id: value.parse().ok().filter(|id| *id > 0).ok_or_else(|| format!("'{uri}': not a server id"))?,
            },
            "agent" if valid_name(value) => Principal::Agent { node: value.to_string() },
            "user" if valid_name(value) => {
                Principal::User { name: value.to_string(), role: None, tenants: BTreeSet::new(), token: None }
            }
            "role" => {
                if role.replace(value.parse::<Role>()?).is_some() {
                    return Err("a certificate names at most one role".into());
                }
                continue;
            }
            "tenant" if valid_name(value) => {
                tenants.insert(value.to_string());
                continue;
            }
            _ => return Err(format!("'{uri}' is not an identity this cluster knows")),
        };
        if who.replace(found).is_some() {
            return Err("a certificate names exactly one server, agent or user".into());
        }
    }
    match who {
        Some(Principal::User { name, .. }) => {
            if !tenants.is_empty() && role != Some(Role::Submitter) {
                return Err("only a submitter certificate names tenants".into());
            }
            // Found by the peer_identity fuzz target: such a certificate was read, though none
            // is ever issued; refuse it as the issuer does.
            if role == Some(Role::Submitter) && tenants.is_empty() {
                return Err("a submitter certificate names at least one tenant".into());
            }
            Ok(Principal::User { name, role, tenants, token: None })
        }
        Some(_) if role.is_some() || !tenants.is_empty() => {
            Err("roles and tenants belong on user certificates only".into())
        }
        Some(p) => Ok(p),
        None => Err("the certificate names no tessera:// identity".into()),
    }
}

/// The principal in a DER certificate.
pub fn from_der(der: &[u8]) -> Result<Principal, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(u.to_string());
            }
        }
    }
    from_uris(uris.iter().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uris() {
        let cases = [
            Principal::Server { id: 3 },
            Principal::Agent { node: "aws-node-17".into() },
            Principal::User { name: "alice".into(), role: None, tenants: BTreeSet::new(), token: None },
            Principal::User {
                name: "bob".into(),
                role: Some(Role::Submitter),
                tenants: ["ml".to_string(), "vision".to_string()].into(),
                token: None,
            },
        ];
        for p in cases {
            let u = uris(&p).unwrap();
            assert_eq!(from_uris(u.iter().map(String::as_str)).unwrap(), p, "{u:?}");
        }
        assert_eq!(uris(&Principal::Server { id: 3 }).unwrap(), vec!["tessera://server/3"]);
    }

    #[test]
    fn ambiguous_or_foreign_identities_are_refused() {
        for bad in [
            vec![],
            vec!["spiffe://x/y"],
            vec!["tessera://server/3", "tessera://agent/a"],
            vec!["tessera://server/0"],
            vec!["tessera://server/3", "tessera://role/admin"],
            vec!["tessera://user/a", "tessera://role/admin", "tessera://role/viewer"],
            vec!["tessera://user/a", "tessera://role/root"],
            vec!["tessera://user/a", "tessera://role/viewer", "tessera://tenant/ml"],
            vec!["tessera://user/a", "tessera://role/submitter"],
            vec!["tessera://agent/a b"],
            vec!["tessera://ghost/1"],
        ] {
            assert!(from_uris(bad.iter().copied()).is_err(), "{bad:?}");
        }
        let sub =
            Principal::User { name: "a".into(), role: Some(Role::Submitter), tenants: BTreeSet::new(), token: None };
        assert!(uris(&sub).is_err());
    }
}
