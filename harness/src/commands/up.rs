//! `up`: starts (or resumes) a local cluster and shows mail going in on one
//! node and out on another.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;

use super::{down, parse_subnet, random_hex};
use crate::client::{Pop3Client, SmtpClient};
use crate::cluster::ClusterState;
use crate::process::NodeProcess;

/// `quill-harness up`.
#[derive(clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: u8,
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// The cluster's directory (state, node data, logs).
    #[arg(long, default_value_os_t = super::default_dir())]
    pub dir: PathBuf,
    /// Password of alice, bob and the load users [default: generated, printed].
    #[arg(long)]
    pub password: Option<String>,
    /// First three octets of the nodes' addresses.
    #[arg(long, default_value = "127.0.0")]
    pub subnet: String,
    /// Leave the cluster running and return (stop it with `down`).
    #[arg(long)]
    pub detach: bool,
    /// The nodes' --repair-grace: how long a node may be down before
    /// its copies are made again elsewhere (e.g. 5s) [default: the
    /// node's, 30s].
    #[arg(long)]
    pub repair_grace: Option<String>,
    /// One more `quill node` flag for every node, e.g.
    /// --node-arg=--relay-host=127.0.0.9:2525 (repeatable; kept for the
    /// cluster's later starts).
    #[arg(long, allow_hyphen_values = true)]
    pub node_arg: Vec<String>,
    /// The `quill` binary every node runs [default: the one beside this
    /// harness, or $QUILL_BIN; a resumed cluster keeps its own].
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// `up`: starts (or resumes) the cluster in `dir` and shows mail going in
/// on one node and out on another.
pub async fn up(a: UpArgs) -> anyhow::Result<()> {
    let UpArgs {
        dir,
        nodes,
        replicas,
        password,
        subnet,
        detach,
        repair_grace,
        node_arg,
        binary,
    } = a;
    if nodes == 0 || nodes > 250 {
        bail!("--nodes must be 1..=250");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut state = match ClusterState::load(&dir) {
        Ok(s) => {
            if !s.live().is_empty() {
                bail!(
                    "a cluster is already running from {} (nodes {:?}); `{} down --dir {}` stops it",
                    dir.display(),
                    s.live(),
                    crate::harness_command(),
                    dir.display()
                );
            }
            println!("resuming the cluster in {} ({} nodes)", dir.display(), s.nodes.len());
            s
        }
        Err(_) => ClusterState::new(
            parse_subnet(&subnet)?,
            nodes,
            replicas,
            match password {
                Some(p) => p,
                None => random_hex(6)?,
            },
        )?,
    };
    if repair_grace.is_some() {
        state.repair_grace = repair_grace;
    }
    if !node_arg.is_empty() {
        state.node_args = node_arg;
    }
    if let Some(b) = binary {
        state.binary = b
            .canonicalize()
            .with_context(|| format!("no quill binary at {}", b.display()))?;
        for n in &mut state.nodes {
            n.binary = None;
        }
    }
    let handles = state.start_all(&dir, true).await?;
    let first = &handles[0];
    let domains = first.admin(Method::GET, "/v1/domains", None).await?.to_string();
    if !domains.contains("\"example.org\"") {
        first.add_domain("example.org").await?;
    }
    let users = first.admin(Method::GET, "/v1/users", None).await?.to_string();
    for u in ["alice@example.org", "bob@example.org"] {
        if !users.contains(&format!("\"{u}\"")) {
            first.add_user(u, &state.password, None).await?;
        }
    }
    // The directory reaches every node through Raft.
    for h in &handles {
        let end = Instant::now() + Duration::from_secs(30);
        while !h
            .admin(Method::GET, "/v1/users", None)
            .await
            .is_ok_and(|v| v.to_string().contains("bob@example.org"))
        {
            if Instant::now() > end {
                bail!("the users did not reach {}", h.opts.ip);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let reader = handles.get(1).unwrap_or(first);
    show_mail(first, reader, &state.password).await?;
    print_instructions(&state, &dir);
    if detach {
        println!(
            "\nThe nodes keep running; `{} down --dir {}` stops them.",
            crate::harness_command(),
            dir.display()
        );
        return Ok(());
    }
    println!("\nRunning. Press Ctrl-C to stop the cluster.");
    // Until Ctrl-C, SIGTERM or SIGHUP (the nodes are stopped: none is left
    // running without its harness), or until `down` (from elsewhere) has
    // stopped every node.
    let stop = crate::process::stop_signal()?;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            sig = &mut stop => { println!("{sig}: stopping the cluster"); break; }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if ClusterState::load(&dir).is_ok_and(|s| s.live().is_empty()) {
                    println!("every node has stopped");
                    return Ok(());
                }
            }
        }
    }
    down(dir).await
}

/// Sends alice -> bob through `writer`'s SMTP and prints what `reader`'s
/// POP3 gives back.
pub async fn show_mail(writer: &NodeProcess, reader: &NodeProcess, password: &str) -> anyhow::Result<()> {
    let body = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: Hello from Quill\r\n\r\nIt works.\r\n";
    let mut smtp = SmtpClient::connect(writer.smtp(), false).await?;
    let replies = smtp.send_mail("alice@example.org", &["bob@example.org"], body).await?;
    smtp.quit().await?;
    println!("\nSMTP  {}: alice -> bob: {}", writer.smtp(), replies[0].text.trim());
    let mut pop = Pop3Client::connect(reader.pop3()).await?;
    pop.login("bob@example.org", password).await?;
    let list = pop.uidl().await?;
    let (n, _) = list.last().context("bob's mailbox is empty")?;
    let msg = pop.retr(*n).await?;
    pop.quit().await?;
    println!(
        "POP3  {}: bob has {} message(s); the newest one reads:\n",
        reader.pop3(),
        list.len()
    );
    for line in String::from_utf8_lossy(&msg).lines() {
        println!("    | {line}");
    }
    Ok(())
}

fn print_instructions(state: &ClusterState, dir: &Path) {
    let pw = &state.password;
    println!(
        "\nQuill cluster of {} nodes (R={}), data and logs in {}:",
        state.nodes.len(),
        state.replicas,
        dir.display()
    );
    for n in &state.nodes {
        let ip = state.ip(n.k);
        println!(
            "  n{}: SMTP {ip}:2525  LMTP {ip}:2424  POP3 {ip}:2110  IMAP {ip}:2143  submission {ip}:2587  SMTPS {ip}:2465  POP3S {ip}:2995  IMAPS {ip}:2993  admin {ip}:8080",
            n.k
        );
    }
    let a = state.ip(state.nodes[0].k);
    let b = state.ip(state.nodes.get(1).unwrap_or(&state.nodes[0]).k);
    let d = dir.display();
    let h = crate::harness_command();
    let cert_b = ClusterState::data(dir, state.nodes.get(1).unwrap_or(&state.nodes[0]).k).join("tls-self-signed.crt");
    let cert_b = cert_b.display();
    println!(
        r#"  users alice@example.org and bob@example.org, password {pw}; admin token {token}

Send a message to one node (swaks, or Python's smtplib):
  swaks --server {a}:2525 --from alice@example.org --to bob@example.org
  python3 -c "import smtplib; smtplib.SMTP('{a}', 2525).sendmail('alice@example.org', ['bob@example.org'], 'Subject: hi\r\n\r\nhello\r\n')"
Read it from another (Python's poplib):
  python3 -c "import poplib; p = poplib.POP3('{b}', 2110); p.user('bob@example.org'); p.pass_('{pw}'); print(p.stat()); print(b'\n'.join(p.retr(len(p.list()[1]))[1]).decode())"
Or over IMAP (Python's imaplib; the same UIDs on every node):
  python3 -c "import imaplib; m = imaplib.IMAP4('{b}', 2143); m.login('bob@example.org', '{pw}'); m.select('INBOX'); print(m.uid('SEARCH', 'ALL')); print(m.uid('FETCH', '1:*', '(UID RFC822.SIZE)'))"
Over TLS (STARTTLS on 2525, 2110 and 2143, implicit TLS on 2465, 2995 and 2993;
each node serves its own self-signed certificate, DATA/tls-self-signed.crt,
until --tls-cert/--tls-key give a real one):
  swaks --server {b}:2525 --tls --from alice@example.org --to bob@example.org
  openssl s_client -connect {b}:2110 -starttls pop3 -CAfile {cert_b}
  python3 -c "import poplib, ssl; p = poplib.POP3_SSL('{b}', 2995, context=ssl.create_default_context(cafile='{cert_b}')); p.user('bob@example.org'); p.pass_('{pw}'); print(p.stat())"
  python3 -c "import imaplib, ssl; m = imaplib.IMAP4_SSL('{b}', 2993, ssl_context=ssl.create_default_context(cafile='{cert_b}')); m.login('bob@example.org', '{pw}'); print(m.select('INBOX'))"
Drive it:
  {h} status --dir {d}
  {h} load --dir {d} --duration 60s --kill n2@20s --restart n2@40s --out {d}/run1
  {h} verify --dir {d} --out {d}/run1
  {h} add|kill|restart|drain NODE --dir {d};  {h} down --dir {d}"#,
        token = state.admin_token
    );
}
