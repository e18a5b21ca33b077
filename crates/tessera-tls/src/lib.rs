//! Mutual TLS for every Tessera link: CLI and clients to servers, agents to servers, and
//! servers to each other. rustls with the ring provider; no OpenSSL.
//!
//! - [`identity`]: what a certificate says its holder is (`tessera://server/3`,
//!   `tessera://agent/aws-node-17`, `tessera://user/alice` plus role and tenants).
//! - [`issue`]: a CA and the certificates it issues (rcgen), keys written 0600.
//! - [`Tls`]: the CA bundle, certificate and key of one process, loaded into rustls server and
//!   client configurations, and reloaded when the files change or on SIGHUP. A reload changes
//!   what new connections use; connections already open (agent streams, Raft links) go on.
//!   [`Tls::from_pem`] takes the PEM text from memory instead (no reload), for a program that
//!   holds thousands of identities, like the load generator's simulated agents.
//! - [`Security`]: TLS or `--insecure`, with the server's acceptor ([`Security::incoming`],
//!   handshakes off the accept loop, the peer's identity parsed once per connection) and the
//!   clients' connector ([`Security::connect`], which also checks that the far end holds a
//!   server certificate).

pub mod identity;
pub mod issue;
mod net;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tessera_core::acl::Principal;

pub use net::{Conn, PeerInfo, Security};

/// Something about certificates went wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// Which file.
        path: String,
        /// What.
        message: String,
    },
    /// The files do not make a usable TLS configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// A certificate could not be issued.
    #[error("issuing a certificate: {0}")]
    Issue(String),
}

/// Where one process's CA bundle, certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA bundle (PEM; may hold several CAs while one replaces another).
    pub ca: PathBuf,
    /// This process's certificate (PEM; may be followed by intermediates).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files a `tessera certs` directory holds for `stem` (`server-1`, `agent-aws-1`,
    /// `user-alice`): `dir/ca.pem`, `dir/<stem>.pem`, `dir/<stem>-key.pem`.
    pub fn in_dir(dir: &Path, stem: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [&self.ca, &self.cert, &self.key]
            .iter()
            .map(|p| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())))
            .collect()
    }
}

fn file_err(p: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::File { path: p.display().to_string(), message: e.to_string() }
}

/// The rustls configurations built from one set of files, and the identity they carry.
struct Loaded {
    server: Arc<ServerConfig>,
    /// For browsers (the web dashboard): the same certificate, no client certificate asked
    /// (users sign in with a token), HTTP/1.1.
    browser: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Principal,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let stamp = files.stamp();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
        .map_err(file_err(&files.ca))?
        .collect::<Result<_, _>>()
        .map_err(file_err(&files.ca))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(file_err(&files.cert))?
        .collect::<Result<_, _>>()
        .map_err(file_err(&files.cert))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(file_err(&files.key))?;
    let name = |p: &Path| p.display().to_string();
    build(cas, chain, key, [&name(&files.ca), &name(&files.cert), &name(&files.key)], stamp)
}

fn pem_err(what: &'static str) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError {
    move |e| TlsError::Config(format!("{what}: {e}"))
}

/// The configurations for a CA bundle, a certificate chain and its key; `names` (CA,
/// certificate, key) say where they came from in errors.
fn build(
    cas: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    [ca_name, cert_name, key_name]: [&str; 3],
    stamp: Vec<Option<(SystemTime, u64)>>,
) -> Result<Loaded, TlsError> {
    if cas.is_empty() {
        return Err(TlsError::File { path: ca_name.to_string(), message: "holds no certificate".into() });
    }
    let mut roots = RootCertStore::empty();
    for c in cas {
        roots.add(c).map_err(|e| TlsError::Config(format!("CA bundle {ca_name}: {e}")))?;
    }
    let Some(leaf) = chain.first() else {
        return Err(TlsError::File { path: cert_name.to_string(), message: "holds no certificate".into() });
    };
    let identity = identity::from_der(leaf).map_err(|m| TlsError::Config(format!("certificate {cert_name}: {m}")))?;
    let roots = Arc::new(roots);
    let bad = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::Config(format!("certificate {cert_name} and key {key_name}: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut browser = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad)?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::Config(format!("certificate {cert_name} and key {key_name}: {e}")))?;
    browser.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(bad)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { server: Arc::new(server), browser: Arc::new(browser), client: Arc::new(client), identity, stamp })
}

/// One process's TLS material: reloadable when it came from files ([`Tls::load`]), fixed when
/// it came from memory ([`Tls::from_pem`]).
pub struct Tls {
    /// None for material given in memory: nothing to reload from.
    files: Option<TlsFiles>,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Load the files; errors name the file.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let loaded = load(&files)?;
        Ok(Arc::new(Tls { files: Some(files), current: RwLock::new(Arc::new(loaded)) }))
    }

    /// TLS material from PEM text in memory: the CA bundle, the certificate (maybe followed by
    /// intermediates) and its key. For programs that hold many identities at once (the load
    /// generator's thousands of simulated agents) and would otherwise write a file pair for
    /// each. It is not reloadable: there are no files to watch, [`Tls::reload`] does nothing
    /// and [`Tls::watch`] ends at once.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<Tls>, TlsError> {
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(pem_err("CA bundle PEM"))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(pem_err("certificate PEM"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("key PEM"))?;
        let loaded = build(cas, chain, key, ["CA bundle PEM", "certificate PEM", "key PEM"], Vec::new())?;
        Ok(Arc::new(Tls { files: None, current: RwLock::new(Arc::new(loaded)) }))
    }

    fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Who this process's certificate says it is.
    pub fn identity(&self) -> Principal {
        self.current().identity.clone()
    }

    /// The files; None for material given in memory ([`Tls::from_pem`]).
    pub fn files(&self) -> Option<&TlsFiles> {
        self.files.as_ref()
    }

    /// An acceptor for browsers (the web dashboard): this process's certificate, as reloaded,
    /// without asking for a client certificate.
    pub fn browser_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current().browser.clone())
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Load the files again if they changed (or `force`); keeps the old material when the new
    /// files do not load. Returns whether new material is in use: always `Ok(false)` for
    /// material given in memory ([`Tls::from_pem`]), which has no files to load again.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let Some(files) = &self.files else { return Ok(false) };
        if !force && files.stamp() == self.current().stamp {
            return Ok(false);
        }
        let loaded = load(files)?;
        let was = self.current().identity.clone();
        if loaded.identity != was {
            return Err(TlsError::Config(format!(
                "the new certificate is {} but this process is {}; not reloading",
                loaded.identity.audit_name(),
                was.audit_name()
            )));
        }
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(loaded),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(loaded),
        }
        Ok(true)
    }

    /// Watch the files: reload on SIGHUP and when they change (checked every `every`). The
    /// task ends when the last other reference to `self` is dropped, and at once for material
    /// given in memory ([`Tls::from_pem`]).
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let from_files = self.files.is_some();
        tokio::spawn(async move {
            if !from_files {
                return;
            }
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                let forced = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let Some(tls) = weak.upgrade() else { return };
                match tls.reload(forced) {
                    Ok(true) => {
                        let cert = tls.files.as_ref().map(|f| f.cert.display().to_string()).unwrap_or_default();
                        tracing::info!(%cert, "TLS certificates reloaded");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificates not reloaded; the previous ones stay in use")
                    }
                }
            }
        })
    }
}
