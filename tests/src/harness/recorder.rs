//! A TCP relay between a client and the proxy that records every byte the client receives,
//! for the universal leak oracle (threat model: scan the whole server→client stream).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Recorder {
    pub addr: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    /// Listens on loopback and relays each connection to `target`.
    pub async fn start(target: SocketAddr) -> Recorder {
        Recorder::start_capped(target, usize::MAX).await
    }

    /// As `start`, recording only the first `cap` bytes (for long streams of which only the
    /// start matters: the handshake's BackendKeyData, say).
    pub async fn start_capped(target: SocketAddr, cap: usize) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind recorder");
        let addr = listener.local_addr().expect("addr");
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                {
                                    let mut kept = sink.lock().expect("recorder lock");
                                    let room = cap.saturating_sub(kept.len()).min(n);
                                    kept.extend_from_slice(&buf[..room]);
                                }
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = cw.shutdown().await;
                    up.abort();
                });
            }
        });
        Recorder { addr, bytes }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Everything recorded so far.
    pub fn captured(&self) -> Vec<u8> {
        self.bytes.lock().expect("recorder lock").clone()
    }
}
