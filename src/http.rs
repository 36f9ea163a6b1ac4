//! The metrics and health endpoint: `GET /metrics` (Prometheus text format)
//! and `GET /healthz` (200 once partitions are assigned and Pub/Sub accepts
//! publishes; 503 with the reason otherwise), served by hyper.
//!
//! Invariants: it runs on its own thread and runtime, reads only atomics and
//! short mutexes, and never blocks the pipeline. It holds against clients
//! that anything in a cluster can be: each connection is its own task (a
//! slow one never delays another), serves one request, must send its headers
//! within [`HEADER_DEADLINE`] and is closed [`CONNECTION_DEADLINE`] after it
//! opened whatever it does; headers are limited to [`MAX_HEADER_BYTES`] and
//! bodies are never read; at most [`MAX_CONNECTIONS`] are served at once, at
//! most [`MAX_PER_PEER`] from one address, and others are closed at once, so
//! memory stays bounded and one client cannot lock the probes out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::hook::HookFactory;
use crate::metrics::Metrics;

/// How long a client may take to send its request line and headers.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// How long any connection may stay open.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);
/// The longest request line and headers accepted (hyper's minimum buffer).
pub const MAX_HEADER_BYTES: usize = 8192;
/// Connections served at once (each holds at most a header buffer).
pub const MAX_CONNECTIONS: usize = 512;
/// Connections one peer address may hold at once, so that one client cannot
/// take every slot from the probes.
pub const MAX_PER_PEER: usize = 32;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("metrics.listen {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics endpoint: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the endpoint reads.
struct State {
    metrics: Arc<Metrics>,
    hooks: Arc<dyn HookFactory>,
}

/// Binds `address` and serves on a background thread until the process
/// ends; returns the bound address.
///
/// # Errors
/// [`ServeError`] naming the address that cannot be bound.
pub fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    hooks: Arc<dyn HookFactory>,
) -> Result<SocketAddr, ServeError> {
    let bind = |source| ServeError::Bind { address, source };
    let listener = std::net::TcpListener::bind(address).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let bound = listener.local_addr().unwrap_or(address);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Thread)?;
    let state = Arc::new(State { metrics, hooks });
    std::thread::Builder::new()
        .name("ztfhook-http".into())
        .spawn(move || runtime.block_on(accept(listener, state)))
        .map_err(ServeError::Thread)?;
    Ok(bound)
}

async fn accept(listener: std::net::TcpListener, state: Arc<State>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics endpoint: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::debug!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("metrics endpoint: {MAX_CONNECTIONS} connections open; closing {peer}");
            continue;
        };
        let ip = peer.ip();
        {
            let mut open = peers.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(ip).or_insert(0);
            if *n >= MAX_PER_PEER {
                tracing::debug!(
                    "metrics endpoint: {ip} has {MAX_PER_PEER} connections open; closing another"
                );
                continue;
            }
            *n += 1;
        }
        let peer_slot = PeerSlot(Arc::clone(&peers), ip);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _slot = (slot, peer_slot);
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(answer(&request, &state)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .max_buf_size(MAX_HEADER_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics endpoint: {peer}: {e}"),
                Err(_) => tracing::debug!(
                    "metrics endpoint: {peer}: closed after {} s",
                    CONNECTION_DEADLINE.as_secs()
                ),
            }
        });
    }
}

/// One open connection of a peer, given back when it closes.
struct PeerSlot(
    Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    std::net::IpAddr,
);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

fn answer(request: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(state.hooks.reloads()),
        ),
        (&Method::GET, "/healthz") => match state.metrics.health() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
