//! `bench-idle`: IMAP IDLE on a three-node cluster. How soon a session
//! idling on node 2 hears of a message delivered through node 1 (from the
//! sender's `250`) and of a flag set through node 3 (from the `STORE`'s
//! `OK`), and what many idle sessions cost node 1's CPU while nothing
//! happens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::ms;
use crate::SmtpClient;
use crate::cluster::ClusterState;

/// Every wait of the benchmark is bounded by this.
const WAIT: Duration = Duration::from_secs(30);
/// Sessions a user has at most (the node is started allowing as many).
const SESSIONS_PER_USER: usize = 50;
/// Sessions opened at once.
const OPENING: usize = 100;

/// A bare IMAP client: tagged commands, untagged lines waited for.
struct Imap {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    tag: u32,
}

impl Imap {
    async fn open(addr: SocketAddr, user: &str, password: &str) -> anyhow::Result<Imap> {
        let s = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await??;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Imap {
            r: BufReader::new(r),
            w,
            tag: 0,
        };
        c.line().await?;
        c.command(&format!("LOGIN {user} {password}")).await?;
        c.command("SELECT INBOX").await?;
        Ok(c)
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut l = String::new();
        let n = tokio::time::timeout(WAIT, self.r.read_line(&mut l))
            .await
            .context("no line within the wait")??;
        ensure!(n > 0, "the server closed the connection");
        Ok(l)
    }

    /// Sends a command; its untagged lines, once it ended `OK`.
    async fn command(&mut self, cmd: &str) -> anyhow::Result<Vec<String>> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        self.w.write_all(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        let mut lines = Vec::new();
        loop {
            let l = self.line().await?;
            if let Some(rest) = l.strip_prefix(&format!("{tag} ")) {
                ensure!(rest.starts_with("OK"), "{cmd}: {l}");
                return Ok(lines);
            }
            lines.push(l);
        }
    }

    async fn idle(&mut self) -> anyhow::Result<()> {
        self.tag += 1;
        self.w.write_all(format!("a{} IDLE\r\n", self.tag).as_bytes()).await?;
        let l = self.line().await?;
        ensure!(l.starts_with('+'), "IDLE refused: {l}");
        Ok(())
    }

    /// Reads until a line containing `needle`.
    async fn until(&mut self, needle: &str) -> anyhow::Result<String> {
        loop {
            let l = self.line().await?;
            if l.contains(needle) {
                return Ok(l);
            }
        }
    }
}

fn user(u: usize) -> (String, String) {
    (format!("user{u:04}@example.com"), format!("pass{u:04}"))
}

fn line(name: &str, v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{name} n={} ms_p50={} p99={} max={}",
        v.len(),
        ms(v, 50.0),
        ms(v, 99.0),
        ms(v, 100.0)
    )
}

pub async fn bench_idle(rounds: usize, sessions: usize, settle: Duration, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (_temp, dir) = crate::process::or_fresh(dir, "bench-idle")?;
    let users = sessions.div_ceil(SESSIONS_PER_USER).max(1);
    let subnet = [127, 5, 1 + (std::process::id() % 200) as u8];
    let mut state = ClusterState::new(subnet, 3, 2, "unused".into())?;
    state.log = "warn".into();
    // Room for every session from one address (a tenth of the
    // connections is kept for addresses holding none).
    let room = (sessions * 2 + 1000).to_string();
    state.node_args = [
        "--max-connections",
        &room,
        "--max-connections-per-ip",
        &room,
        "--max-imap-sessions-per-user",
        &SESSIONS_PER_USER.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let base = dir.join("cluster");
    let nodes = state.start_all(&base, false).await?;
    let run = super::ClusterRun::new(&base);
    nodes[0].add_domain("example.com").await?;
    for u in 1..=users {
        let (name, pw) = user(u);
        nodes[0].add_user(&name, &pw, None).await?;
    }
    super::users_on_every_node(&nodes, &user(users).0).await?;

    // How soon an IDLE on node 2 hears of changes made through 1 and 3.
    let (name, pw) = user(1);
    let mut idler = Imap::open(nodes[1].imap(), &name, &pw).await?;
    let mut flagger = Imap::open(nodes[2].imap(), &name, &pw).await?;
    idler.idle().await?;
    let mut smtp = SmtpClient::connect(nodes[0].smtp(), false).await?;
    let (mut delivered, mut flagged) = (Vec::new(), Vec::new());
    for i in 1..=rounds {
        let body = format!("Subject: idle {i}\r\n\r\nround {i}\r\n");
        let replies = smtp.send_mail("bench@example.net", &[&name], body.as_bytes()).await?;
        ensure!(replies.iter().all(|r| r.is_ok()), "delivery refused: {replies:?}");
        let t = Instant::now();
        let l = idler.until("EXISTS").await?;
        delivered.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(l.trim() == format!("* {i} EXISTS"), "unexpected {l}");
        flagger.command("NOOP").await?;
        flagger.command(&format!("STORE {i} +FLAGS.SILENT (\\Flagged)")).await?;
        let t = Instant::now();
        idler.until("FETCH").await?;
        flagged.push(t.elapsed().as_secs_f64() * 1e3);
    }
    smtp.quit().await?;
    println!("{}", line("idle_sees_delivery", &mut delivered));
    println!("{}", line("idle_sees_flag", &mut flagged));
    drop((idler, flagger));

    // What idle sessions cost node 1 while nothing happens, beside what it
    // spends with none (heartbeats, pings, anti-entropy).
    let pid = ClusterState::load(&base)?.nodes[0].pid.context("node 1's pid")?;
    let cpu0 = crate::process::cpu_secs(pid)?;
    tokio::time::sleep(settle).await;
    let quiet = (crate::process::cpu_secs(pid)? - cpu0) / settle.as_secs_f64() * 100.0;
    let addr = nodes[0].imap();
    let mut idle = Vec::with_capacity(sessions);
    let t = Instant::now();
    for chunk in (0..sessions).collect::<Vec<_>>().chunks(OPENING) {
        let mut opening = tokio::task::JoinSet::new();
        for &s in chunk {
            opening.spawn(async move {
                let (name, pw) = user(1 + s % users);
                let mut c = Imap::open(addr, &name, &pw).await?;
                c.idle().await?;
                anyhow::Ok(c)
            });
        }
        while let Some(c) = opening.join_next().await {
            idle.push(c??);
        }
    }
    let opening = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = crate::process::cpu_secs(pid)?;
    tokio::time::sleep(settle).await;
    let cpu = crate::process::cpu_secs(pid)? - cpu0;
    println!(
        "idle_sessions={} users={users} opened_secs={opening:.1} node_cpu_percent_of_a_core={:.2} \
         without_sessions={quiet:.2} over_secs={}",
        idle.len(),
        cpu / settle.as_secs_f64() * 100.0,
        settle.as_secs()
    );
    drop(idle);
    run.stop()
}
