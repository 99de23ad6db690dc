//! The listeners: accept loop, HTTP/1.1 and HTTP/2 (h2c, or ALPN over TLS) on the public
//! listener, axum on the admin listener, and graceful shutdown.
//!
//! The caller binds both listeners and hands them over, so tests bind port 0.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use carrel_core::config::{ServerConfig, TlsConfig};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::AppState;
use crate::pipeline;
use crate::startup::InitError;

/// Largest HTTP/2 header list accepted (hyper's default is 16 MiB).
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// Largest HTTP/1 read buffer, which bounds the request head.
const H1_MAX_BUF: usize = 64 * 1024;

/// Loads the PEM certificate chain and key into a TLS acceptor offering h2 and http/1.1.
pub fn tls_acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, InitError> {
    let tls_err = |what: &str, e: &dyn std::fmt::Display| InitError::Tls(format!("{what}: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| tls_err(&format!("server.tls.cert ({})", cfg.cert.display()), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&format!("server.tls.cert ({})", cfg.cert.display()), &e))?;
    if certs.is_empty() {
        return Err(InitError::Tls(format!(
            "server.tls.cert ({}): no certificate found",
            cfg.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| tls_err(&format!("server.tls.key ({})", cfg.key.display()), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("tls", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("server.tls", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn http_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(H1_MAX_BUF)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024);
    builder
}

/// Serves the public listener (the pipeline) and the admin listener (the admin router) until
/// `shutdown` is cancelled, then stops accepting, lets in-flight requests finish for up to
/// `server.shutdown_grace_ms`, and returns.
pub async fn run(
    public: TcpListener,
    admin: TcpListener,
    state: AppState,
    admin_router: axum::Router,
    cfg: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), InitError> {
    let tls = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    let builder = http_builder(cfg);
    // Every connection task is tracked so shutdown can wait for them.
    let tracker = TaskTracker::new();
    // Tells open connections to finish their current requests and close.
    let graceful = GracefulShutdown::new();

    let admin_shutdown = shutdown.clone();
    let admin_task = tracker.spawn(async move {
        let served = axum::serve(admin, admin_router)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    loop {
        let (stream, _peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = public.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(pipeline::handle(&state, req).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        match &tls {
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = watcher.watch(conn);
                tracker.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = cfg.header_read_timeout;
                tracker.spawn(async move {
                    let tls_stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }

    state.start_draining();
    drop(public);
    tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: draining connections");
    if tokio::time::timeout(cfg.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
    tracker.close();
    let _ = tokio::time::timeout(cfg.shutdown_grace, admin_task).await;
    tracing::info!("stopped");
    Ok(())
}
