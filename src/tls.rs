//! TLS: the process's one crypto provider, and the server's optional TLS and mTLS.
//!
//! The server terminates TLS itself rather than through tonic's `ServerTlsConfig`, which is
//! fixed at start and offers ALPN `h2` only. Here:
//! - [`ServerTls`] holds the configuration built from the certificate, key and (for mTLS) client
//!   CA files; the server's file watcher rebuilds it when they change (cert-manager rewrites them
//!   in place), so new connections get the new certificate while open ones keep theirs. A change
//!   that does not make a usable configuration (a key that does not match its certificate, half
//!   way through a rotation) keeps the one in use and is offered again at the next check.
//! - ALPN offers `h2` and `http/1.1`, so the REST routes work over TLS too.
//! - [`Accepted`] turns accepted connections into served ones, running TLS handshakes
//!   concurrently (one slow client does not hold up the next) within the handshake timeout.
//!   Every handshake is a tracked task, aborted with the server.
//! - A client certificate's subject is the caller's identity in logs (`ConnInfo::client`).

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tracing::debug;

use crate::{
    connection::{Closed, Conn, ConnInfo, Incoming, refused},
    secrets::Live,
};

/// Installs ring as the rustls crypto provider of every HTTPS/WSS client (reqwest is built
/// without a default provider, whose default would be aws-lc-rs; see Cargo.toml). Call it before
/// building a TLS client; later calls do nothing.
pub fn install_crypto_provider() {
    // Fails harmlessly when a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The files the server's TLS is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; `None`: no client
    /// certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS files do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("client CA {path}: {source}")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("client CA {path}: a certificate is not usable as a trust anchor: {source}")]
    TrustAnchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate {cert} with key {key}: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The server's TLS configuration, swapped when its files change.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Live<ServerConfig>,
}

impl ServerTls {
    /// Builds the configuration from `files`; fails when they do not make one.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = build(&files)?;
        Ok(ServerTls {
            files,
            current: Live::new(config),
        })
    }

    /// Rebuilds the configuration from the files as they are now; on failure the one in use
    /// stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.set(build(&self.files)?);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.get())
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
        path: files.key.clone(),
        source,
    })?;
    let config_error = |source| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(config_error)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    // with_single_cert refuses a key that does not match the certificate, which is what a
    // rotation caught between writing the two files looks like.
    let mut config = builder.with_single_cert(certs, key).map_err(config_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::TrustAnchor {
            path: path.to_owned(),
            source,
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|source| TlsError::ClientCa {
            path: path.to_owned(),
            source,
        })
}

/// The subject of a DER certificate, as `CN=..., O=...`.
fn subject_of(cert: &CertificateDer<'_>) -> Option<Arc<str>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string().into())
}

/// A connection being served: plain, or over TLS.
pub enum ServedConn {
    Plain(Conn),
    Tls {
        stream: Box<TlsStream<Conn>>,
        /// The subject of the client's certificate (mTLS).
        client: Option<Arc<str>>,
    },
}

impl Connected for ServedConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            ServedConn::Plain(conn) => conn.connect_info(),
            ServedConn::Tls { stream, client } => {
                let mut info = stream.get_ref().0.connect_info();
                info.client = client.clone();
                info
            }
        }
    }
}

impl AsyncRead for ServedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServedConn::Plain(conn) => Pin::new(conn).poll_read(cx, buf),
            ServedConn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServedConn::Plain(conn) => Pin::new(conn).poll_write(cx, buf),
            ServedConn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServedConn::Plain(conn) => Pin::new(conn).poll_write_vectored(cx, bufs),
            ServedConn::Tls { stream, .. } => {
                Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServedConn::Plain(conn) => conn.is_write_vectored(),
            ServedConn::Tls { stream, .. } => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServedConn::Plain(conn) => Pin::new(conn).poll_flush(cx),
            ServedConn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServedConn::Plain(conn) => Pin::new(conn).poll_shutdown(cx),
            ServedConn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepted connections, ready to serve: as they come, or after their TLS handshake.
pub struct Accepted {
    incoming: Incoming,
    incoming_done: bool,
    tls: Option<ServerTls>,
    handshake_timeout: Duration,
    /// Handshakes in flight; each holds an admitted connection, so `--max-connections` bounds
    /// them.
    handshakes: JoinSet<Option<ServedConn>>,
}

impl Accepted {
    pub fn new(incoming: Incoming, tls: Option<ServerTls>, handshake_timeout: Duration) -> Self {
        Accepted {
            incoming,
            incoming_done: false,
            tls,
            handshake_timeout,
            handshakes: JoinSet::new(),
        }
    }
}

async fn handshake(acceptor: TlsAcceptor, conn: Conn, within: Duration) -> Option<ServedConn> {
    let peer = conn.connect_info().tcp.remote_addr();
    match tokio::time::timeout(within, acceptor.accept(conn)).await {
        Ok(Ok(stream)) => {
            let client = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(subject_of);
            debug!(?peer, client = client.as_deref(), "TLS connection");
            Some(ServedConn::Tls {
                stream: Box::new(stream),
                client,
            })
        }
        Ok(Err(error)) => {
            debug!(?peer, %error, "TLS handshake failed");
            // Timeouts and evictions are the connection's own errors, counted where raised.
            if !matches!(
                error.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionAborted
            ) {
                refused(Closed::Tls);
            }
            None
        }
        Err(_) => {
            debug!(?peer, ?within, "TLS handshake timed out");
            refused(Closed::HandshakeTimeout);
            None
        }
    }
}

impl Stream for Accepted {
    type Item = io::Result<ServedConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if !this.incoming_done {
                match Pin::new(&mut this.incoming).poll_next(cx) {
                    Poll::Ready(Some(Ok(conn))) => match &this.tls {
                        None => return Poll::Ready(Some(Ok(ServedConn::Plain(conn)))),
                        Some(tls) => {
                            let acceptor = tls.acceptor();
                            this.handshakes.spawn(handshake(
                                acceptor,
                                conn,
                                this.handshake_timeout,
                            ));
                            continue;
                        }
                    },
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => this.incoming_done = true,
                    Poll::Pending => {}
                }
            }
            return match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => Poll::Ready(Some(Ok(conn))),
                // Failed handshakes were logged by their task.
                Poll::Ready(Some(Ok(None) | Err(_))) => continue,
                Poll::Ready(None) if this.incoming_done => Poll::Ready(None),
                // No handshake in flight: `incoming` has the waker.
                Poll::Ready(None) | Poll::Pending => Poll::Pending,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_names_its_subject() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "platform");
        let cert = params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        assert_eq!(
            subject_of(cert.der()).as_deref(),
            Some("CN=alice, O=platform")
        );
        assert_eq!(subject_of(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[test]
    fn unreadable_or_empty_files_are_errors_not_panics() {
        let dir = std::env::temp_dir().join(format!("sandbox-runner-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty.clone(),
            client_ca: None,
        };
        assert!(matches!(build(&files), Err(TlsError::NoCertificate { .. })));
        let missing = TlsFiles {
            cert: dir.join("missing.pem"),
            ..files
        };
        assert!(matches!(build(&missing), Err(TlsError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
