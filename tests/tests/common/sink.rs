//! A scripted SMTP server on loopback, as a node's `--relay-host` (or a
//! remote MX): what it took, and how often each address was tried.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One message the sink took.
#[derive(Debug, Clone)]
pub struct Got {
    pub from: String,
    pub rcpts: Vec<String>,
    pub data: String,
}

/// A scripted SMTP server: `reject*@` gets `550 5.1.1`, `defer*@` gets
/// `451 4.2.0` for the first `defers` tries of each address, anything
/// else is accepted.
#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    pub tries: Arc<Mutex<HashMap<String, u32>>>,
}

impl Sink {
    pub async fn start(defers: u32) -> Sink {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), defers)
    }

    pub fn start_on(listener: TcpListener, defers: u32) -> Sink {
        let sink = Sink {
            addr: listener.local_addr().unwrap(),
            got: Arc::default(),
            tries: Arc::default(),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move { s.serve(conn, defers).await });
            }
        });
        sink
    }

    async fn serve(&self, conn: TcpStream, defers: u32) {
        let (r, mut w) = conn.into_split();
        let mut r = BufReader::new(r);
        let _ = w.write_all(b"220 sink.test ESMTP\r\n").await;
        let (mut from, mut rcpts) = (String::new(), Vec::new());
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let upper = line.to_ascii_uppercase();
            let reply = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                "250-sink.test\r\n250 8BITMIME".to_owned()
            } else if upper.starts_with("MAIL FROM:") {
                from = addr_of(&line);
                rcpts.clear();
                "250 2.1.0 ok".to_owned()
            } else if upper.starts_with("RCPT TO:") {
                let a = addr_of(&line);
                let n = {
                    let mut t = self.tries.lock().unwrap();
                    let n = t.entry(a.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                if a.starts_with("reject") {
                    format!("550 5.1.1 <{a}>: no such user")
                } else if a.starts_with("defer") && n <= defers {
                    format!("451 4.2.0 <{a}>: try again later")
                } else {
                    rcpts.push(a);
                    "250 2.1.5 ok".to_owned()
                }
            } else if upper.starts_with("DATA") {
                let _ = w.write_all(b"354 go ahead\r\n").await;
                let mut data = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                self.got.lock().unwrap().push(Got {
                    from: from.clone(),
                    rcpts: rcpts.clone(),
                    data,
                });
                "250 2.0.0 queued".to_owned()
            } else if upper.starts_with("QUIT") {
                let _ = w.write_all(b"221 bye\r\n").await;
                return;
            } else {
                "250 ok".to_owned()
            };
            if w.write_all(format!("{reply}\r\n").as_bytes()).await.is_err() {
                return;
            }
        }
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// The `Subject:` line of each message taken, sorted (a duplicate
    /// shows twice).
    #[allow(dead_code)] // Not every test binary that has the sink uses it.
    pub fn subjects(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .got()
            .iter()
            .map(|g| {
                g.data
                    .lines()
                    .find(|l| l.starts_with("Subject: "))
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        s.sort();
        s
    }
}

fn addr_of(line: &str) -> String {
    let start = line.find('<').map_or(0, |i| i + 1);
    let end = line[start..].find('>').map_or(line.len(), |i| start + i);
    line[start..end].to_ascii_lowercase()
}
