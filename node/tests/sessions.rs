//! The SMTP and POP3 sessions against a two-node cluster on the in-memory
//! network: no sockets, no processes, only the sessions' own byte streams
//! (`tokio::io::duplex`). What a client sees is the same as over TCP.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, cluster, peer, services, services_with};
use quill_node::{Limits, pop3, smtp};
use testkit::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_in_and_pop3_out_on_the_in_memory_cluster() {
    let dir = TempDir::new("sessions").expect("temp dir");
    let reps = cluster(&dir);
    let services = services(&dir, &reps[0]).await;
    let (_stop_tx, stop) = watch::channel(false);

    // SMTP, pipelined as a client may.
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(smtp::serve(
        server,
        peer(),
        services.clone(),
        smtp::Mode::Smtp,
        stop.clone(),
    ));
    let mut c = Client(BufReader::new(client));
    assert!(c.reply().await.starts_with("220 "));
    c.send("EHLO c.test\r\n").await;
    assert!(c.reply().await.contains("250 HELP"));
    c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 "));
    assert!(c.reply().await.starts_with("250 "));
    assert!(c.reply().await.starts_with("354 "));
    c.send("Subject: in memory\r\n\r\n..dot\r\nbody\r\n.\r\n").await;
    let r = c.reply().await;
    assert!(r.starts_with("250 2.0.0 Ok: stored as"), "{r}");
    c.send("QUIT\r\n").await;
    assert!(c.reply().await.starts_with("221 "));
    // R=2: both nodes hold it.
    for r in &reps {
        assert_eq!(r.store().list("alice@example.org").len(), 1, "node {}", r.id());
    }

    // POP3: the message, dot-stuffed again, then gone from both after QUIT.
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(pop3::serve(server, peer(), services.clone(), stop.clone()));
    let mut p = Client(BufReader::new(client));
    assert!(p.line().await.starts_with("+OK"));
    p.send("USER alice@example.org\r\nPASS pw\r\n").await;
    assert!(p.line().await.starts_with("+OK"));
    let r = p.line().await;
    assert!(r.starts_with("+OK maildrop has 1 messages"), "{r}");
    p.send("RETR 1\r\n").await;
    assert!(p.line().await.starts_with("+OK"));
    let mut msg = String::new();
    loop {
        let l = p.line().await;
        if l == ".\r\n" {
            break;
        }
        msg.push_str(&l);
    }
    assert!(msg.starts_with("Received: "), "{msg}");
    assert!(msg.ends_with("Subject: in memory\r\n\r\n..dot\r\nbody\r\n"), "{msg}");
    p.send("DELE 1\r\nQUIT\r\n").await;
    assert!(p.line().await.starts_with("+OK"));
    assert!(p.line().await.starts_with("+OK"));
    for r in &reps {
        assert!(r.store().list("alice@example.org").is_empty(), "node {}", r.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaffold_ends_abusive_sessions_with_each_protocols_words() {
    let dir = TempDir::new("sessions-abuse").expect("temp dir");
    let reps = cluster(&dir);
    let services = services(&dir, &reps[0]).await;
    let (stop_tx, stop) = watch::channel(false);

    // Too many bad commands: 421 (SMTP), -ERR (POP3).
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(smtp::serve(
        server,
        peer(),
        services.clone(),
        smtp::Mode::Smtp,
        stop.clone(),
    ));
    let mut c = Client(BufReader::new(client));
    c.reply().await;
    let mut last = String::new();
    for _ in 0..Limits::default().bad_commands_max {
        c.send("BOGUS\r\n").await;
        last = c.reply().await;
    }
    let end = c.reply().await;
    assert!(last.starts_with("500") && end.starts_with("421 4.7.0"), "{last} {end}");

    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(pop3::serve(server, peer(), services.clone(), stop.clone()));
    let mut p = Client(BufReader::new(client));
    p.line().await;
    p.send(&format!("NOOP {}\r\n", "x".repeat(2000))).await;
    assert_eq!(p.line().await, "-ERR line too long\r\n");

    // Shutdown: each open session says so in its own words.
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(smtp::serve(
        server,
        peer(),
        services.clone(),
        smtp::Mode::Lmtp,
        stop.clone(),
    ));
    let mut l = Client(BufReader::new(client));
    l.reply().await;
    stop_tx.send(true).expect("stop");
    assert!(l.reply().await.starts_with("421 4.3.2"));
    assert!(p.line().await.starts_with("-ERR [SYS/TEMP] server shutting down"));
}

/// A store whose fsync failed takes no more writes: DATA gets `451 4.3.0`
/// (never `250`), the session goes on, and every later delivery is
/// refused the same way without touching the disk again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_turns_deliveries_into_451() {
    let dir = TempDir::new("sessions-fsync").expect("temp dir");
    let reps = cluster(&dir);
    let services = services(&dir, &reps[0]).await;
    let (_stop_tx, stop) = watch::channel(false);
    for r in &reps {
        r.store().inject_sync_failure();
    }
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(smtp::serve(server, peer(), services, smtp::Mode::Smtp, stop));
    let mut c = Client(BufReader::new(client));
    assert!(c.reply().await.starts_with("220 "));
    c.send("EHLO c.test\r\n").await;
    assert!(c.reply().await.contains("250 HELP"));
    for attempt in 0..3 {
        c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
            .await;
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("354 "));
        c.send("Subject: doomed\r\n\r\nbody\r\n.\r\n").await;
        let r = c.reply().await;
        assert!(r.starts_with("451 4.3.0"), "attempt {attempt}: {r}");
        for rep in &reps {
            let why = rep.store().failure().expect("stopped");
            assert!(why.contains("fsync failed"), "{why}");
        }
    }
    c.send("QUIT\r\n").await;
    assert!(c.reply().await.starts_with("221 "));
    for r in &reps {
        assert!(r.store().list("alice@example.org").is_empty());
    }
}

/// Slowloris: a command trickled a byte at a time must still arrive whole
/// within the idle timeout, and DATA must keep a minimum average rate past
/// its grace; a client that stops reading is dropped once a write stalls
/// that long. (The idle timeout used to restart with every byte.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_are_cut_off() {
    let dir = TempDir::new("sessions-slow").expect("temp dir");
    let reps = cluster(&dir);
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        transfer_grace: Duration::from_millis(500),
        transfer_bytes_per_sec_min: 2_000,
        ..Limits::default()
    };
    let services = services_with(&dir, &reps[0], limits).await;
    let (_stop_tx, stop) = watch::channel(false);
    let start_smtp = || {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(smtp::serve(
            server,
            peer(),
            services.clone(),
            smtp::Mode::Smtp,
            stop.clone(),
        ));
        Client(BufReader::new(client))
    };

    // A command, a byte every 200 ms: cut after about a second.
    let mut c = start_smtp();
    assert!(c.reply().await.starts_with("220 "));
    let t0 = std::time::Instant::now();
    let trickle = async {
        for b in b"NOOP NOOP NOOP NOOP NOOP NOOP".iter() {
            if c.0.get_mut().write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    trickle.await;
    let r = c.reply().await;
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // DATA at 50 bytes a second, far below the minimum: cut past the grace.
    let mut c = start_smtp();
    begin_data(&mut c).await;
    let t0 = std::time::Instant::now();
    let mut cut = None;
    for _ in 0..40 {
        if c.0.get_mut().write_all(b"slow line\r\n").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !c.0.buffer().is_empty()
            || tokio::time::timeout(Duration::from_millis(1), c.0.fill_buf())
                .await
                .is_ok()
        {
            cut = Some(c.reply().await);
            break;
        }
    }
    let r = cut.expect("the slow transfer was cut");
    assert!(r.starts_with("421 4.4.2 Message transfer too slow"), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(reps[0].store().list("alice@example.org").is_empty());

    // A message at full speed is fine with the same limits.
    let mut c = start_smtp();
    begin_data(&mut c).await;
    let body = format!("{}\r\n", "x".repeat(70)).repeat(2000);
    c.send(&format!("{body}.\r\n")).await;
    let r = c.reply().await;
    assert!(r.starts_with("250 2.0.0"), "{r}");

    // POP3: a client that asks for a large message and never reads.
    let (client, server) = tokio::io::duplex(1024);
    let session = tokio::spawn(pop3::serve(server, peer(), services.clone(), stop.clone()));
    let mut p = Client(BufReader::new(client));
    assert!(p.line().await.starts_with("+OK"));
    p.send("USER alice@example.org\r\n").await;
    assert!(p.line().await.starts_with("+OK"));
    p.send("PASS pw\r\n").await;
    assert!(p.line().await.starts_with("+OK"));
    p.send("RETR 1\r\n").await;
    let t0 = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
    assert!(ended.is_ok(), "a session whose client stopped reading must end");
    eprintln!("the non-reading POP3 client was dropped after {:?}", t0.elapsed());
}

/// Greeting, EHLO, one recipient, DATA: ready for the message.
async fn begin_data(c: &mut Client) {
    assert!(c.reply().await.starts_with("220 "));
    c.send("EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        assert!(c.reply().await.starts_with("250"));
    }
    assert!(c.reply().await.starts_with("354 "));
}

/// Messages being received share one memory budget per node: a message
/// that would take it past its bound gets `452 4.3.1` (after its end, the
/// session stays in step) and the sender may retry once memory is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_share_a_memory_budget() {
    let dir = TempDir::new("sessions-mem").expect("temp dir");
    let reps = cluster(&dir);
    let limits = Limits {
        data_memory_bytes_max: 1 << 20,
        ..Limits::default()
    };
    let services = services_with(&dir, &reps[0], limits).await;
    let (_stop_tx, stop) = watch::channel(false);
    let open = || {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(smtp::serve(
            server,
            peer(),
            services.clone(),
            smtp::Mode::Smtp,
            stop.clone(),
        ));
        Client(BufReader::new(client))
    };
    let half = format!("{}\r\n", "y".repeat(98)).repeat(4_000); // 400 KB
    let mut a = open();
    begin_data(&mut a).await;
    a.send(&half).await;
    // Let the node read all of A's lines before B starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = open();
    begin_data(&mut b).await;
    b.send(&format!("{half}.\r\n")).await;
    let r = b.reply().await;
    assert!(r.starts_with("452 4.3.1"), "{r}");
    a.send(".\r\n").await;
    let r = a.reply().await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    // Memory is back (A's permit goes with its message, just after its
    // reply): B's retry goes through, in the same session.
    testkit::wait_for("A's permit back", Duration::from_secs(5), || async {
        services.data_budget.available_permits() == 16
    })
    .await;
    b.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        .await;
    for _ in 0..2 {
        assert!(b.reply().await.starts_with("250"));
    }
    assert!(b.reply().await.starts_with("354 "));
    b.send(&format!("{half}.\r\n")).await;
    let r = b.reply().await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    // The permit goes with the message, right after the reply.
    testkit::wait_for("every permit back", Duration::from_secs(5), || async {
        services.data_budget.available_permits() == 16
    })
    .await;
}

/// Expired queue entries: the one from a sender gets a DSN (into the
/// local sender's mailbox), the one from the null sender `<>` (a bounce
/// itself) gets none; both leave the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_bounces_except_to_the_null_sender() {
    use quill_node::outbound::{Outbound, OutboundConfig, enqueue};
    use quill_proto::queue::{Envelope, SHARDS, Schedule, shard_mailbox};
    let dir = TempDir::new("expired").expect("temp dir");
    let reps = cluster(&dir);
    // Never reached: both outlive the queue (lifetime 1 ms).
    let limits = quill_node::Limits {
        queue: quill_node::services::QueuePolicy {
            schedule: Schedule {
                initial_ms: 10,
                max_ms: 10,
                lifetime_ms: 1,
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let s = common::services_with(&dir, &reps[0], limits).await;
    let env = |from: &str| Envelope {
        from: from.into(),
        rcpts: vec!["x@remote.test".into()],
        queued_ms: 1,
        submitter: None,
    };
    assert!(enqueue(&s, &env("alice@example.org"), b"Subject: one\r\n\r\nx\r\n").await);
    assert!(enqueue(&s, &env(""), b"Subject: a bounce\r\n\r\nx\r\n").await);
    let cfg = OutboundConfig {
        relay_host: Some("127.0.0.1:9".into()),
        ..OutboundConfig::default()
    };
    let no_keys = Arc::new(quill_node::dkim::Signer::new(Arc::new(
        membership::dkim::DkimKeys::default(),
    )));
    let out = Outbound::new(s.clone(), cfg, Arc::new(|_: &str| true), no_keys).expect("outbound");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(out.run(stop_rx));
    let queued = || async {
        let mut n = 0;
        for k in 0..SHARDS {
            n += s.mail.mailbox(&shard_mailbox(k)).await.len();
        }
        n
    };
    testkit::wait_for("an empty queue", Duration::from_secs(20), || async {
        queued().await == 0
    })
    .await;
    let _ = stop_tx.send(true);
    task.await.expect("the worker stops");
    let inbox = s.mail.mailbox("alice@example.org").await;
    assert_eq!(inbox.len(), 1, "one DSN, for alice's message only");
    let dsn = s.mail.read(&inbox[0]).await.expect("the DSN reads");
    let text = String::from_utf8_lossy(&dsn);
    assert!(
        text.contains("Action: failed\r\nStatus: 4.4.7") && text.contains("Subject: one"),
        "{text}"
    );
    assert_eq!(s.queue.bounces.get(), 1);
    assert_eq!(s.queue.failed.get(), 2);
}
