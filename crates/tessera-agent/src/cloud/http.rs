//! One bounded HTTP/1.1 exchange per call: a fresh connection, a deadline over connect, request
//! and the whole body, and a cap on the body size. Metadata calls are rare, so no pooling.

use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;

use super::{CloudError, MAX_BODY_BYTES};

/// Where requests go: parsed from `http://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    host: String,
    port: u16,
    /// `host[:port]` for the Host header.
    authority: String,
}

impl Target {
    /// Parse `http://host[:port][/]`: plain HTTP (the metadata services have no TLS), no path,
    /// query, fragment or user info. IPv6 literals go in brackets.
    pub(super) fn parse(endpoint: &str) -> Result<Target, String> {
        let rest = endpoint.strip_prefix("http://").ok_or("must start with http://")?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err("has no host".into());
        }
        if rest.bytes().any(|c| matches!(c, b'/' | b'?' | b'#' | b'@') || !c.is_ascii_graphic()) {
            return Err("must be just http://host[:port], with no path, query or user".into());
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or("has an unclosed '['")?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("'{host}' is not an IPv6 address"));
            }
            (host, after.strip_prefix(':'))
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => {
                p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("port '{p}' is not 1..=65535"))?
            }
        };
        if host.is_empty() || !host.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':')) {
            return Err(format!("host '{host}' is not a host name or address"));
        }
        Ok(Target { host: host.to_string(), port, authority: rest.to_string() })
    }

    /// True when the host is a loopback address literal (or `localhost`).
    pub(super) fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// A complete, size-checked answer.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

/// Aborts the connection task when the exchange ends (or its deadline drops it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Send one request and read the whole answer within `timeout`; bodies over
/// [`MAX_BODY_BYTES`] are refused, whether announced by Content-Length or streamed.
pub(super) async fn request(
    target: &Target,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<Reply, CloudError> {
    let exchange = exchange(target, method, path, headers, body.unwrap_or_default());
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(CloudError::Timeout { path: path.to_string(), ms: timeout.as_millis() as u64 }),
    }
}

async fn exchange(
    target: &Target,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, CloudError> {
    let transport = |message: String| CloudError::Transport { path: path.to_string(), message };
    // Unit-test builds never talk to anything but loopback, checked before any packet leaves.
    if cfg!(test) && !target.is_loopback() {
        return Err(transport(format!("{}: test builds only talk to loopback", target.authority)));
    }
    let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| transport(format!("connect to {}: {e}", target.authority)))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| transport(format!("handshake: {e}")))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut req = Request::builder().method(method).uri(path).header(hyper::header::HOST, &target.authority);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body)).map_err(|e| transport(format!("cannot build the request: {e}")))?;
    let resp = sender.send_request(req).await.map_err(|e| transport(format!("request: {e}")))?;
    let (parts, body) = resp.into_parts();
    let too_large = || CloudError::TooLarge { path: path.to_string(), limit: MAX_BODY_BYTES };
    let announced = parts.headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    if announced.and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => return Err(transport(format!("reading the body: {e}"))),
    };
    Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
}
