//! A certificate authority and the certificates it issues (rcgen, ECDSA P-256).
//!
//! `tessera certs` and `tessera dev` use this. Private keys are written with mode 0600, through
//! a temporary file renamed into place, so a server or agent watching the file never reads
//! half a key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tessera_core::acl::Principal;
use time::{Duration, OffsetDateTime};

use crate::TlsError;

/// A CA that can issue certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

fn rc(what: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Issue(format!("{what}: {e}"))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that disagree a little.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days.max(1)));
}

impl Ca {
    /// A new self-signed CA named `name`, valid for `days`.
    pub fn create(name: &str, days: u32) -> Result<(Ca, Issued), TlsError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Tessera");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, days);
        let key = KeyPair::generate().map_err(rc("CA key"))?;
        let cert = params.self_signed(&key).map_err(rc("CA certificate"))?;
        let issued = Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        let ca = Ca::load(&issued.cert_pem, &issued.key_pem)?;
        Ok((ca, issued))
    }

    /// A CA from its PEM certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(rc("CA certificate"))?;
        Ok(Ca { cert_pem: cert_pem.to_string(), issuer })
    }

    /// A CA from the files `dir/ca.pem` and `dir/ca-key.pem`.
    pub fn load_dir(dir: &Path) -> Result<Ca, TlsError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p)
                .map_err(|e| TlsError::File { path: p.display().to_string(), message: e.to_string() })
        };
        Ca::load(&read("ca.pem")?, &read("ca-key.pem")?)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue a certificate for `who`, valid for `days`. `hosts` (DNS names or IP addresses)
    /// go into a server certificate so clients can verify the address they dialled.
    pub fn issue(&self, who: &Principal, hosts: &[String], days: u32) -> Result<Issued, TlsError> {
        let uris = crate::identity::uris(who).map_err(TlsError::Issue)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, uris[0].trim_start_matches(crate::identity::SCHEME));
        dn.push(DnType::OrganizationName, "Tessera");
        params.distinguished_name = dn;
        for u in &uris {
            params.subject_alt_names.push(SanType::URI(u.as_str().try_into().map_err(rc("identity URI"))?));
        }
        let server = matches!(who, Principal::Server { .. });
        if !server && !hosts.is_empty() {
            return Err(TlsError::Issue("--host is for server certificates".into()));
        }
        for h in hosts {
            match h.parse::<IpAddr>() {
                Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
                Err(_) => params.subject_alt_names.push(SanType::DnsName(h.as_str().try_into().map_err(rc("host"))?)),
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        // Servers are clients of each other (Raft, forwarding), so theirs serve both ends.
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let key = KeyPair::generate().map_err(rc("key"))?;
        let cert = params.signed_by(&key, &self.issuer).map_err(rc("certificate"))?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Write `contents` to `path` atomically (temporary file, then rename), with `mode`.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |e: std::io::Error| TlsError::File { path: path.display().to_string(), message: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Write a certificate (0644) and its key (0600) as `dir/<stem>.pem` and `dir/<stem>-key.pem`.
pub fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}-key.pem"));
    write_file(&key, &issued.key_pem, 0o600)?;
    write_file(&cert, &issued.cert_pem, 0o644)?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_ca_issues_certificates_that_carry_their_identity() {
        let (ca, files) = Ca::create("test CA", 1).unwrap();
        let again = Ca::load(&files.cert_pem, &files.key_pem).unwrap();
        let who = Principal::Agent { node: "aws-node-17".into() };
        let issued = again.issue(&who, &[], 1).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert_eq!(crate::identity::from_der(&der).unwrap(), who);
        assert!(ca.issue(&who, &["127.0.0.1".into()], 1).is_err(), "hosts only on server certificates");
        let server = ca.issue(&Principal::Server { id: 2 }, &["127.0.0.1".into(), "localhost".into()], 1).unwrap();
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn keys_are_written_private() {
        let dir = tempfile::tempdir().unwrap();
        let (_, files) = Ca::create("test CA", 1).unwrap();
        let (cert, key) = write_pair(dir.path(), "ca", &files).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(key.ends_with("ca-key.pem"));
        Ca::load_dir(dir.path()).unwrap();
    }
}
