//! `demo`: one node on 127.0.0.1 with the standard ports; mail in and out.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;

use crate::process::{NodeOptions, NodeProcess};

pub async fn demo(dir: Option<PathBuf>, password: Option<String>, exit: bool) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join(format!("quill-demo-{}", std::process::id())));
    let password = match password {
        Some(p) => p,
        None => quill_node::files::random_bytes()?
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect(),
    };
    let mut opts = NodeOptions::new(&dir, Ipv4Addr::LOCALHOST)?;
    opts.admin_token = quill_node::files::random_bytes()?
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    opts.extra_args = vec!["--replicas".into(), "1".into()];
    println!("starting a Quill node in {} ...", dir.display());
    let mut node = NodeProcess::start(opts)
        .await
        .context("the demo node did not start (ports 2525, 2424, 2110, 8080 and 7400 on 127.0.0.1 must be free)")?;
    let result = demo_steps(&node, &password).await;
    if let Err(e) = &result {
        println!("demo failed: {e:#}\nnode log:\n{}", node.log_tail(20));
    }
    if result.is_ok() && !exit {
        println!("\nRunning. Press Ctrl-C to stop the node.");
        let sig = crate::process::stop_signal()?.await;
        println!("{sig}: stopping the node");
    }
    node.stop().await?;
    println!("node stopped; its data stays in {}", dir.display());
    result
}

async fn demo_steps(node: &NodeProcess, password: &str) -> anyhow::Result<()> {
    if !node
        .admin(hyper::Method::GET, "/v1/domains", None)
        .await?
        .to_string()
        .contains("\"example.org\"")
    {
        node.add_domain("example.org").await?;
    }
    let users = node.admin(hyper::Method::GET, "/v1/users", None).await?.to_string();
    for u in ["alice@example.org", "bob@example.org"] {
        if users.contains(&format!("\"{u}\"")) {
            // A rerun on the same data directory: give them this run's password.
            let body = serde_json::json!({ "password": password });
            node.admin(hyper::Method::PUT, &format!("/v1/users/{u}/password"), Some(body))
                .await?;
        } else {
            node.add_user(u, password, None).await?;
        }
    }
    super::show_mail(node, node, password).await?;
    let token = &node.opts.admin_token;
    let quill = node.opts.binary.display();
    println!(
        r#"
Quill is serving on 127.0.0.1:
  SMTP 127.0.0.1:2525   LMTP 127.0.0.1:2424   POP3 127.0.0.1:2110   admin 127.0.0.1:8080
  users alice@example.org and bob@example.org, password {password}

Send a message (swaks, or Python's smtplib):
  swaks --server 127.0.0.1:2525 --from alice@example.org --to bob@example.org
  python3 -c "import smtplib; smtplib.SMTP('127.0.0.1', 2525).sendmail('alice@example.org', ['bob@example.org'], 'Subject: hi\r\n\r\nhello\r\n')"
Read it (Python's poplib):
  python3 -c "import poplib; p = poplib.POP3('127.0.0.1', 2110); p.user('bob@example.org'); p.pass_('{password}'); print(p.stat()); print(b'\n'.join(p.retr(len(p.list()[1]))[1]).decode())"
Administer it:
  {quill} admin --node 127.0.0.1:8080 --token {token} cluster status
  {quill} admin --node 127.0.0.1:8080 --token {token} user add carol@example.org --password secret"#
    );
    Ok(())
}
