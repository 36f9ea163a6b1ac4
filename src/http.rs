//! The metrics and health endpoint: `GET /metrics` (Prometheus text format)
//! and `GET /healthz` (200 once partitions are assigned and Pub/Sub accepts
//! publishes; 503 with the reason otherwise).
//!
//! Invariants: it runs on its own thread, reads only atomics and short
//! mutexes, answers one request per connection and never blocks the
//! pipeline; a slow or broken client is dropped after `CLIENT_TIMEOUT`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::hook::HookFactory;
use crate::metrics::Metrics;

/// How long a client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `address` and serves on a background thread until the process ends.
///
/// # Errors
/// The bind error, naming the address.
pub fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    hooks: Arc<dyn HookFactory>,
) -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind(address).map_err(|e| format!("metrics.listen {address}: {e}"))?;
    let bound = listener.local_addr().unwrap_or(address);
    std::thread::Builder::new()
        .name("ztfhook-http".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &metrics, hooks.as_ref()) {
                    tracing::debug!("metrics endpoint: {e}");
                }
            }
        })
        .map_err(|e| format!("metrics endpoint thread: {e}"))?;
    Ok(bound)
}

fn answer(stream: TcpStream, metrics: &Metrics, hooks: &dyn HookFactory) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers are read and ignored.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics.render(hooks.reloads()),
        ),
        ("GET", "/healthz") => match metrics.health() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
