//! Connection slots for the client protocols, shared by every listener of a
//! node: a cap in all, a share per client address that shrinks as the node
//! fills, a reserve that only addresses holding no connection may use, and,
//! when full, the longest-idle session closed to make room for a newcomer.
//!
//! A session is idle since the last line it sent ([`Tracked`] notes every
//! line feed read), so a client trickling a byte a second into a command
//! that never ends is idle too. Without this, 17 addresses holding 64
//! connections each filled all 1 024 slots and every other client got `421`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// A session idle for less than this is never closed to make room.
pub const EVICT_IDLE_MIN: Duration = Duration::from_secs(10);

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address holds its share already.
    PerAddress,
    /// Every slot is taken and no session has been idle long enough.
    Full,
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    info: Arc<SessionInfo>,
    /// Milliseconds since `Slots::epoch` of the last line feed read.
    activity: Arc<AtomicU64>,
    close: watch::Sender<bool>,
    evicted: bool,
}

/// What the session list (`quill admin sessions`) shows of a connection,
/// and whether an operator watches it (`quill admin log-level --user`).
#[derive(Debug)]
pub struct SessionInfo {
    /// The listener's protocol (`smtp`, `imap`, ...).
    pub protocol: &'static str,
    pub peer: SocketAddr,
    /// Unix milliseconds.
    pub since_ms: u64,
    user: Mutex<Option<String>>,
    tls: std::sync::atomic::AtomicBool,
    /// Unix milliseconds until which the session is watched (0: not).
    watched_until_ms: AtomicU64,
    watches: Arc<Watches>,
}

impl SessionInfo {
    pub fn user(&self) -> Option<String> {
        self.user.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn tls(&self) -> bool {
        self.tls.load(Ordering::Relaxed)
    }

    /// Whether every command of this session is logged now.
    pub fn watched(&self) -> bool {
        self.watched_until_ms.load(Ordering::Relaxed) > unix_ms()
    }

    fn set_user(&self, user: &str) {
        *self.user.lock().unwrap_or_else(|p| p.into_inner()) = Some(user.to_owned());
        self.watched_until_ms
            .fetch_max(self.watches.until_ms(user), Ordering::Relaxed);
    }
}

/// Who is watched, until when (unix ms): users' addresses (lower case) and
/// client IP addresses, as text. Bounded.
#[derive(Debug, Default)]
pub struct Watches(Mutex<HashMap<String, u64>>);

/// Watches kept at most (the oldest-ending goes first).
pub const WATCHES_MAX: usize = 256;

impl Watches {
    fn until_ms(&self, target: &str) -> u64 {
        let w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.get(&target.to_ascii_lowercase()).copied().unwrap_or(0)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

tokio::task_local! {
    /// The session the running task serves (set by the listener).
    static CURRENT: Arc<SessionInfo>;
}

/// Runs `f` as the session `info` (see [`note_user`], [`watched`]).
pub fn scope<F: std::future::Future>(info: Arc<SessionInfo>, f: F) -> impl std::future::Future<Output = F::Output> {
    CURRENT.scope(info, f)
}

/// The session's user is now known (a login).
pub fn note_user(user: &str) {
    let _ = CURRENT.try_with(|s| s.set_user(user));
}

/// The session is now under TLS (STARTTLS, or an implicit-TLS port).
pub fn note_tls() {
    let _ = CURRENT.try_with(|s| s.tls.store(true, Ordering::Relaxed));
}

/// Logs a command line of the session this task serves, if watched
/// (secrets hidden: `quill_proto::line::loggable`).
pub fn log_command(line: &[u8]) {
    if let Some(s) = watched() {
        tracing::info!(
            target: "quill::watch",
            protocol = s.protocol,
            peer = %s.peer,
            user = s.user().as_deref().unwrap_or("-"),
            command = %quill_proto::line::loggable(line),
            "watched session"
        );
    }
}

/// The session this task serves, when an operator watches it.
pub fn watched() -> Option<Arc<SessionInfo>> {
    CURRENT.try_with(|s| s.watched().then(|| s.clone())).ok().flatten()
}

#[derive(Debug, Default)]
struct Inner {
    by_address: HashMap<IpAddr, u32>,
    sessions: HashMap<u64, Entry>,
    next_id: u64,
    stopping: bool,
}

/// See the module docs. One per node.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    /// May change while the node runs (a cluster setting).
    per_address_max: AtomicU32,
    epoch: Instant,
    watches: Arc<Watches>,
    inner: Mutex<Inner>,
}

/// Held while a connection is open: gives its slot back when dropped.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Slots>,
    id: u64,
    /// Becomes true when the session must end (evicted, or the node stops).
    pub close: watch::Receiver<bool>,
    pub activity: Arc<AtomicU64>,
    pub info: Arc<SessionInfo>,
}

impl Slots {
    pub fn new(max: usize, per_address_max: u32) -> Arc<Slots> {
        Arc::new(Slots {
            max: max.max(1),
            per_address_max: AtomicU32::new(per_address_max.max(1)),
            epoch: Instant::now(),
            watches: Arc::default(),
            inner: Mutex::default(),
        })
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Changes each address's full share, for connections from now on.
    pub fn set_per_address_max(&self, n: u32) {
        self.per_address_max.store(n.max(1), Ordering::Relaxed);
    }

    /// Slots kept for addresses that hold none (a tenth).
    fn reserve(&self) -> usize {
        self.max / 10
    }

    /// How many connections one address may hold with `used` slots taken:
    /// the full share up to half the slots, then shrinking with the free
    /// room (never below 1).
    pub fn share(&self, used: usize) -> u32 {
        let full = self.per_address_max.load(Ordering::Relaxed);
        let half = self.max / 2;
        if used <= half || half == 0 {
            return full;
        }
        let free = self.max.saturating_sub(used) as u64;
        ((full as u64 * free / half as u64) as u32).max(1)
    }

    /// A slot for a connection from `ip` at `now`, closing the longest-idle
    /// session when that is the only way to make room.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Slot, Refused> {
        self.acquire_session("", SocketAddr::new(ip, 0), now)
    }

    /// [`Slots::acquire`] for a connection of `protocol` from `peer`, as the
    /// session list shows it.
    pub fn acquire_session(
        self: &Arc<Self>,
        protocol: &'static str,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<Slot, Refused> {
        let ip = peer.ip();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.stopping {
            return Err(Refused::Full);
        }
        // Sessions already told to go do not count against newcomers.
        let used = inner.sessions.values().filter(|e| !e.evicted).count();
        let held = inner.by_address.get(&ip).copied().unwrap_or(0);
        if held >= self.share(used) {
            return Err(Refused::PerAddress);
        }
        // An address that holds connections leaves the reserve to others.
        let room = if held > 0 { self.max - self.reserve() } else { self.max };
        if used >= room {
            let now_ms = self.ms(now);
            let idle_min = EVICT_IDLE_MIN.as_millis() as u64;
            let victim = inner
                .sessions
                .iter()
                .filter(|(_, e)| !e.evicted && now_ms.saturating_sub(e.activity.load(Ordering::Relaxed)) >= idle_min)
                .min_by_key(|(_, e)| e.activity.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            let Some(victim) = victim else {
                return Err(Refused::Full);
            };
            let e = inner.sessions.get_mut(&victim).expect("found");
            e.evicted = true;
            let _ = e.close.send(true);
            tracing::debug!(client = %e.ip, "connections full: closing the longest-idle session");
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let activity = Arc::new(AtomicU64::new(self.ms(now)));
        let (close, rx) = watch::channel(false);
        let info = Arc::new(SessionInfo {
            protocol,
            peer,
            since_ms: unix_ms(),
            user: Mutex::new(None),
            tls: Default::default(),
            watched_until_ms: AtomicU64::new(self.watches.until_ms(&ip.to_string())),
            watches: self.watches.clone(),
        });
        inner.sessions.insert(
            id,
            Entry {
                ip,
                info: info.clone(),
                activity: activity.clone(),
                close,
                evicted: false,
            },
        );
        *inner.by_address.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            owner: self.clone(),
            id,
            close: rx,
            activity,
            info,
        })
    }

    /// Tells every session to end (the node stops); no new slot is given.
    pub fn close_all(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.stopping = true;
        for e in inner.sessions.values() {
            let _ = e.close.send(true);
        }
    }

    /// Every open session's description, oldest first.
    pub fn sessions(&self) -> Vec<Arc<SessionInfo>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Arc<SessionInfo>> = inner.sessions.values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|i| i.since_ms);
        v
    }

    /// Logs every command of `target` (a user's address or a client's IP
    /// address) at info for `for_ms`, on this node: sessions open now and
    /// those to come.
    pub fn watch(&self, target: &str, for_ms: u64) {
        let now = unix_ms();
        let until = now.saturating_add(for_ms);
        let target = target.to_ascii_lowercase();
        {
            let mut w = self.watches.0.lock().unwrap_or_else(|p| p.into_inner());
            w.retain(|_, u| *u > now);
            if w.len() >= WATCHES_MAX
                && !w.contains_key(&target)
                && let Some(k) = w.iter().min_by_key(|(_, u)| **u).map(|(k, _)| k.clone())
            {
                w.remove(&k);
            }
            w.insert(target.clone(), until);
        }
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for e in inner.sessions.values() {
            let user = e.info.user().map(|u| u.to_ascii_lowercase());
            if e.ip.to_string() == target || user.as_deref() == Some(target.as_str()) {
                e.info.watched_until_ms.fetch_max(until, Ordering::Relaxed);
            }
        }
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).sessions.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.owner.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = inner.sessions.remove(&self.id)
            && let Some(n) = inner.by_address.get_mut(&e.ip)
        {
            *n -= 1;
            if *n == 0 {
                inner.by_address.remove(&e.ip);
            }
        }
    }
}

/// A client stream that notes, in its slot, when it last delivered a line
/// feed (the end of a command or of a DATA line).
pub struct Tracked<S> {
    inner: S,
    activity: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, slots: &Slots, slot: &Slot) -> Self {
        Tracked {
            inner,
            activity: slot.activity.clone(),
            epoch: slots.epoch,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled()[before..].contains(&b'\n') {
            let ms = Instant::now().saturating_duration_since(self.epoch).as_millis() as u64;
            self.activity.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 1, n])
    }

    #[test]
    fn a_crowd_of_addresses_cannot_take_every_slot() {
        let s = Slots::new(100, 20);
        let t0 = Instant::now();
        let mut held = Vec::new();
        // Five addresses try for 20 each: the share shrinks past half.
        for a in 1..=5 {
            while let Ok(slot) = s.acquire(ip(a), t0) {
                held.push(slot);
            }
        }
        let used = held.len();
        assert!(used <= 90, "the reserve is left to new addresses: {used}");
        // A new address still gets in, through the reserve.
        let newcomer = s.acquire(ip(50), t0).expect("a new address gets a slot");
        assert_eq!(s.acquire(ip(1), t0).unwrap_err(), Refused::PerAddress);
        held.push(newcomer);
        // Fill the reserve with other new addresses.
        let mut a = 60;
        while s.open() < 100 {
            held.push(s.acquire(ip(a), t0).expect("room"));
            a += 1;
        }
        // Full, nobody idle long enough: refused.
        assert_eq!(s.acquire(ip(200), t0).unwrap_err(), Refused::Full);
        // Later, the longest idle goes to make room; the others are kept.
        let later = t0 + EVICT_IDLE_MIN * 2;
        for h in &held {
            h.activity.store(s.ms(t0) + 1_000, Ordering::Relaxed);
        }
        held[10].activity.store(s.ms(later), Ordering::Relaxed);
        held[0].activity.store(s.ms(t0), Ordering::Relaxed);
        let in_ = s.acquire(ip(201), later).expect("the longest idle made room");
        assert!(*held[0].close.borrow(), "the longest idle was told to close");
        assert!(!*held[10].close.borrow(), "a busy session stays");
        assert_eq!(held.iter().filter(|h| *h.close.borrow()).count(), 1);
        drop(in_);
        let n = held.len();
        drop(held);
        assert_eq!(s.open(), 0, "{n} slots given back");
    }

    #[test]
    fn share_shrinks_with_free_room() {
        let s = Slots::new(1024, 64);
        assert_eq!(s.share(0), 64);
        assert_eq!(s.share(512), 64);
        assert_eq!(s.share(768), 32);
        assert_eq!(s.share(1020), 1);
        assert_eq!(s.share(1024), 1);
    }

    #[test]
    fn close_all_tells_every_session_and_admits_nobody() {
        let s = Slots::new(10, 5);
        let a = s.acquire(ip(1), Instant::now()).unwrap();
        s.close_all();
        assert!(*a.close.borrow());
        assert!(s.acquire(ip(2), Instant::now()).is_err());
    }
}
