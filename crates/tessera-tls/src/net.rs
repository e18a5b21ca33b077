//! The server's acceptor and the clients' connector, for TLS and for `--insecure`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tessera_core::acl::Principal;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Tls;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS with this process's certificates, or none at all (`--insecure`).
#[derive(Debug, Clone)]
pub enum Security {
    /// Plain TCP: no authentication of anyone.
    Insecure,
    /// Mutual TLS.
    Tls(Arc<Tls>),
}

/// What the server knows about the far end of a connection; every request on it carries a
/// copy in its extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its address.
    pub remote: Option<SocketAddr>,
    /// None on a plain connection; otherwise the identity its certificate names, or why it
    /// names none.
    pub identity: Option<Result<Principal, String>>,
}

/// One accepted connection.
pub enum Conn {
    /// Plain TCP (`--insecure`).
    Plain(TcpStream, PeerInfo),
    /// TLS, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

type Incoming = tokio_stream::wrappers::ReceiverStream<io::Result<Conn>>;

impl Security {
    /// Is this TLS?
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// The connections `listener` accepts, handshakes done (each on a task of its own, so a
    /// slow or hostile client holds up no one). A failed handshake (no client certificate,
    /// a certificate from another CA, a plaintext client) drops that connection only. The
    /// accept loop ends, and the listener closes, when the stream is dropped.
    pub fn incoming(&self, listener: TcpListener) -> Incoming {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(128);
        let sec = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                match &sec {
                    Security::Insecure => {
                        let peer = PeerInfo { remote: Some(remote), identity: None };
                        if tx.send(Ok(Conn::Plain(tcp, peer))).await.is_err() {
                            return;
                        }
                    }
                    Security::Tls(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%remote, error = %e, "TLS handshake refused");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%remote, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let identity = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|leaf| crate::identity::from_der(leaf))
                                .unwrap_or_else(|| Err("no client certificate".into()));
                            let peer = PeerInfo { remote: Some(remote), identity: Some(identity) };
                            let _ = tx.send(Ok(Conn::Tls(Box::new(stream), peer))).await;
                        });
                    }
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// An endpoint for `addr` (`HOST:PORT`, or a URI); connect it with [`Security::connect`]
    /// or [`Security::connect_lazy`].
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        Endpoint::from_shared(uri)
    }

    /// Connect now.
    pub async fn connect(&self, ep: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        match self {
            Security::Insecure => ep.connect().await,
            Security::Tls(tls) => ep.connect_with_connector(Connector { tls: tls.clone() }).await,
        }
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn connect_lazy(&self, ep: &Endpoint) -> Channel {
        match self {
            Security::Insecure => ep.connect_lazy(),
            Security::Tls(tls) => ep.connect_with_connector_lazy(Connector { tls: tls.clone() }),
        }
    }
}

/// Dials TLS with the current client configuration, and refuses a far end whose certificate
/// is not a server's.
#[derive(Clone)]
struct Connector {
    tls: Arc<Tls>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.client_config();
        Box::pin(async move {
            let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
            let host = uri.host().ok_or_else(|| bad(format!("{uri}: no host")))?.to_string();
            let port = uri.port_u16().ok_or_else(|| bad(format!("{uri}: no port")))?;
            let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let name = ServerName::try_from(bare.clone()).map_err(|e| bad(format!("{host}: {e}")))?;
            let tcp = TcpStream::connect((bare.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| crate::identity::from_der(leaf))
                .unwrap_or_else(|| Err("no certificate".into()));
            match identity {
                Ok(Principal::Server { .. }) => Ok(TokioIo::new(stream)),
                Ok(other) => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{host}:{port} presented {}'s certificate, not a server's", other.audit_name()),
                )),
                Err(m) => Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{host}:{port}: {m}"))),
            }
        })
    }
}
