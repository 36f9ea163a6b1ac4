//! The metrics and health endpoint against hostile clients: a client that
//! trickles its request, one that never ends its request line, and idle
//! connections neither block `/healthz` nor hold the server's memory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztfhook::hook::Passthrough;
use ztfhook::metrics::Metrics;

fn endpoint() -> SocketAddr {
    ztfhook::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Metrics::new()),
        Arc::new(Passthrough),
    )
    .unwrap()
}

/// `GET path` on a connection of its own: the status line and how long the
/// answer took.
fn get(address: SocketAddr, path: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer.lines().next().unwrap_or_default().to_string();
    (status, started.elapsed())
}

/// Whether the server has closed `s`: a read gives end of file or a reset.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_client_that_sends_a_byte_every_two_seconds_neither_blocks_healthz_nor_stays_open() {
    let address = endpoint();
    let mut slow = TcpStream::connect(address).unwrap();
    let mut trickle = slow.try_clone().unwrap();
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        for b in b"GET /healthz HTTP/1.1\r\nHost: slow\r\n" {
            if trickle.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let (status, took) = get(address, "/healthz");
        assert!(status.starts_with("HTTP/1.1 503"), "{status}");
        assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        closed_by_server(&mut slow, Duration::from_secs(15)),
        "the trickling client is still connected after {:?}",
        started.elapsed()
    );
    let took = started.elapsed();
    assert!(
        took < ztfhook::http::HEADER_DEADLINE + Duration::from_secs(3),
        "closed only after {took:?}"
    );
    println!("a trickling client was closed after {took:?}");
    drop(sender);
}

#[test]
fn a_request_line_without_end_is_cut_off_at_the_header_limit() {
    let address = endpoint();
    let mut endless = TcpStream::connect(address).unwrap();
    endless
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    endless.write_all(b"GET /").unwrap();
    let chunk = vec![b'a'; 4096];
    let mut sent = 0usize;
    // 64 MiB, if the server took it all.
    let refused = (0..16 * 1024).any(|_| match endless.write_all(&chunk) {
        Ok(()) => {
            sent += chunk.len();
            false
        }
        Err(_) => true,
    });
    assert!(refused, "the server took {sent} bytes of one request line");
    println!("the server cut an endless request line after {sent} bytes were sent");
    // Still serving.
    let (status, _) = get(address, "/healthz");
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    let (status, _) = get(address, "/metrics");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[test]
fn idle_connections_are_closed_and_healthz_answers_meanwhile() {
    let address = endpoint();
    let mut idle: Vec<TcpStream> = (0..30)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    let (status, took) = get(address, "/healthz");
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
    let started = Instant::now();
    for s in &mut idle {
        assert!(
            closed_by_server(s, Duration::from_secs(20)),
            "an idle connection is open after {:?}",
            started.elapsed()
        );
    }
    assert!(
        started.elapsed() < ztfhook::http::CONNECTION_DEADLINE + Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn other_paths_and_methods_get_their_status_and_a_body_is_never_read() {
    let address = endpoint();
    assert!(get(address, "/nothing").0.starts_with("HTTP/1.1 404"));
    let mut s = TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A body announced but never sent: the answer does not wait for it.
    write!(
        s,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    .unwrap();
    let mut answer = vec![0u8; 64];
    let n = s.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holding_hundreds_of_idle_connections_does_not_lock_others_out() {
    let address = endpoint();
    // 300 idle connections from 127.0.0.1 ...
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... and a probe from another address, 127.0.0.2.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut probe = socket.connect(address).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), probe.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "a probe from another peer got {answer:?}"
    );
    drop(idle);
}
