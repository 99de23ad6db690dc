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
use tokio::sync::mpsc;
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
///
/// The public listener is served thread per core: `server.workers` threads, each running its own
/// single-threaded runtime with its own upstream connection pool. This task accepts and hands
/// each connection to the next worker in turn; from then on a connection, its requests, and the
/// upstream connections they use are driven by one thread, so a request never waits for another
/// thread to be woken (the profile showed those wake-ups costing ~20 µs at concurrency 1).
/// The admin listener runs on the calling runtime.
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

    let admin_shutdown = shutdown.clone();
    let admin_tracker = TaskTracker::new();
    let admin_task = admin_tracker.spawn(async move {
        // Connection info lets the admin API throttle logins per client address.
        let app = admin_router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let served = axum::serve(admin, app)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    let mut workers = Vec::with_capacity(cfg.workers);
    for i in 0..cfg.workers {
        // Worker 0 takes the client start-up built; every other worker builds its own.
        let worker_state = if i == 0 {
            state.clone()
        } else {
            state
                .for_worker()
                .map_err(|e| InitError::Tls(format!("upstream client: {e}")))?
        };
        let worker = Worker {
            state: Arc::new(worker_state),
            builder: builder.clone(),
            tls: tls.clone(),
            handshake_timeout: cfg.header_read_timeout,
            grace: cfg.shutdown_grace,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(InitError::Runtime)?;
        // Dropping the sender is the worker's signal to stop taking connections and drain.
        let (tx, rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        let thread = std::thread::Builder::new()
            .name(format!("carrel-worker-{i}"))
            .spawn(move || runtime.block_on(worker.serve(rx)))
            .map_err(InitError::Runtime)?;
        workers.push((tx, thread));
    }

    let mut next = 0;
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
        match stream.into_std() {
            Ok(stream) => {
                // A worker only goes away when its thread died; the connection is dropped.
                if workers[next].0.send(stream).is_err() {
                    tracing::error!(worker = next, "worker thread is gone; connection dropped");
                }
                next = (next + 1) % workers.len();
            }
            Err(e) => tracing::warn!(error = %e, "could not hand over a connection"),
        }
    }

    state.start_draining();
    drop(public);
    tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: draining connections");
    let threads: Vec<_> = workers
        .into_iter()
        .map(|(tx, thread)| {
            drop(tx);
            thread
        })
        .collect();
    let joined = tokio::task::spawn_blocking(move || {
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    });
    let _ = joined.await;
    admin_tracker.close();
    let _ = tokio::time::timeout(cfg.shutdown_grace, admin_task).await;
    // Every response has ended (or been cut off): their usage goes to disk, and their
    // settlements to the shared counters, before exit.
    state.ledger.flush().await;
    let _ = tokio::time::timeout(cfg.shutdown_grace, state.quota.quiesce()).await;
    tracing::info!("stopped");
    Ok(())
}

/// One worker thread's share of the public listener.
struct Worker {
    /// Shared state plus this worker's own upstream client.
    state: Arc<AppState>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    grace: Duration,
}

impl Worker {
    /// Serves the connections handed over on `rx` until it closes, then drains.
    async fn serve(self, mut rx: mpsc::UnboundedReceiver<std::net::TcpStream>) {
        // Every connection task is tracked so the drain can wait for them.
        let tracker = TaskTracker::new();
        // Tells open connections to finish their current requests and close.
        let graceful = GracefulShutdown::new();
        while let Some(stream) = rx.recv().await {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => self.connection(stream, &tracker, &graceful),
                Err(e) => tracing::warn!(error = %e, "could not register a connection"),
            }
        }
        if tokio::time::timeout(self.grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
        tracker.close();
    }

    fn connection(
        &self,
        stream: tokio::net::TcpStream,
        tracker: &TaskTracker,
        graceful: &GracefulShutdown,
    ) {
        let state = Arc::clone(&self.state);
        let service = service_fn(move |req| {
            let state = Arc::clone(&state);
            // Boxed: a request's state is over 8 KiB, and hyper keeps a slot the size of the
            // service's future for each connection's whole life (idle keep-alive connections
            // and open streams included). Boxed, it is 288 bytes, and the request's state lives
            // only while the request runs: 8 KiB less per open connection.
            async move { Ok::<_, Infallible>(Box::pin(pipeline::handle(&state, req)).await) }
        });
        let builder = self.builder.clone();
        let watcher = graceful.watcher();
        match &self.tls {
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
                let handshake_timeout = self.handshake_timeout;
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
}
