//! A TCP relay between pgveil and the real test cluster that can fail on command: sever every
//! open connection (a server crash or restart as the proxy sees it), stop listening (server
//! down: connection refused), and answer new connections late (a slow server). Not a mock:
//! every byte still comes from PostgreSQL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct FaultRelay {
    pub port: u16,
    upstream: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    /// Bumped to sever every connection opened before.
    generation: watch::Sender<u64>,
    accept: Option<JoinHandle<()>>,
}

impl FaultRelay {
    pub async fn start(upstream_port: u16) -> FaultRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let mut relay = FaultRelay {
            port,
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            delay_ms: Arc::default(),
            generation: watch::channel(0).0,
            accept: None,
        };
        relay.accept = Some(relay.serve(listener));
        relay
    }

    fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let upstream = self.upstream;
        let delay = Arc::clone(&self.delay_ms);
        let generation = self.generation.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let delay = Duration::from_millis(delay.load(Ordering::Relaxed));
                let mut severed = generation.subscribe();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (mut c, mut s) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                        _ = severed.changed() => {}
                    }
                });
            }
        })
    }

    /// Closes every relayed connection at once, as a crashing server would.
    pub fn sever_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops listening: new connections are refused until `up`.
    pub fn down(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
        }
        self.sever_all();
    }

    /// Listens again on the same port (the server is back).
    pub async fn up(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot listen on the relay port again: {e}"),
            }
        };
        self.accept = Some(self.serve(listener));
    }

    /// New connections wait this long before reaching the server.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
        }
        self.sever_all();
    }
}
