//! Client TLS: the certificates a node serves (STARTTLS, STLS and the
//! implicit-TLS ports), chosen per connection by SNI.
//!
//! Certificates come from PEM files (`--tls-cert`/`--tls-key`, repeatable,
//! re-read when they change) or, without any, from a self-signed one made
//! once in the data directory (the log says so). A pair is checked before it
//! is served: parsable, the key matching the certificate, not expired; a bad
//! pair is refused with the reason and the one served before stays.
//!
//! rustls with ring only, TLS 1.2 and 1.3, the provider's (AEAD, forward
//! secret) cipher suites.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often certificate files are looked at for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Largest PEM file read (a long chain with an RSA-4096 key fits easily).
pub const PEM_BYTES_MAX: usize = 64 * 1024;

/// One certificate pair, checked.
#[derive(Debug, Clone)]
pub struct Pair {
    /// DNS names from the subject alternative names (the common name when
    /// there are none), lowercase; `*.example.org` for a wildcard.
    pub names: Vec<String>,
    /// Seconds since the epoch after which the certificate is expired.
    pub not_after: i64,
    /// blake3 of the leaf certificate, hex: what the log and status show.
    pub fingerprint: String,
    pub key: Arc<CertifiedKey>,
}

/// Checks a certificate chain and key given as PEM: both parse, the key is
/// the certificate's, and `now` (seconds since the epoch) is within the
/// leaf's validity. The error says which check failed.
pub fn check_pair(cert_pem: &[u8], key_pem: &[u8], now: i64) -> anyhow::Result<Pair> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("the certificate PEM does not parse: {e}"))?;
    let Some(leaf) = chain.first() else {
        bail!("no CERTIFICATE block in the certificate PEM");
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| anyhow!("no private key in the key PEM: {e}"))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| anyhow!("the certificate does not parse: {e}"))?;
    let validity = parsed.validity();
    let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    if now > not_after {
        bail!("the certificate expired on {}", validity.not_after);
    }
    if now < not_before {
        bail!("the certificate is not valid before {}", validity.not_before);
    }
    let mut names: Vec<String> = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty()
        && let Some(cn) = parsed.subject().iter_common_name().next().and_then(|c| c.as_str().ok())
    {
        names.push(cn.to_ascii_lowercase());
    }
    let fingerprint = crate::files::hex(&blake3::hash(leaf).as_bytes()[..16]);
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => anyhow!("the private key does not match the certificate"),
        other => anyhow!("the key is not usable: {other}"),
    })?;
    Ok(Pair {
        names,
        not_after,
        fingerprint,
        key: Arc::new(key),
    })
}

fn now_secs() -> i64 {
    i64::try_from(crate::time::now_ms() / 1000).unwrap_or(i64::MAX)
}

/// Whether SNI `host` is one of `name` (exactly, or one label under a
/// `*.` wildcard).
fn matches(name: &str, host: &str) -> bool {
    if let Some(base) = name.strip_prefix("*.") {
        return host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == base);
    }
    name == host
}

/// The certificates a node serves, swapped in place as files or the
/// cluster's store change.
#[derive(Debug)]
pub struct Certs {
    /// Stored cluster-wide (`quill admin tls set`), by name, `default`
    /// first: preferred, so every node serves the same.
    cluster: RwLock<Vec<(String, Arc<Pair>)>>,
    /// From this node's files, or its self-signed pair.
    pairs: RwLock<Vec<Arc<Pair>>>,
}

impl Certs {
    pub fn new(pairs: Vec<Pair>) -> Self {
        Certs {
            cluster: RwLock::new(Vec::new()),
            pairs: RwLock::new(pairs.into_iter().map(Arc::new).collect()),
        }
    }

    /// The cluster-wide pairs being served, by name.
    pub fn cluster(&self) -> Vec<(String, Arc<Pair>)> {
        self.cluster.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This node's own pairs (files or self-signed).
    pub fn local(&self) -> Vec<Arc<Pair>> {
        self.pairs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The pair served for SNI `host`: the first whose names hold it
    /// exactly, else by wildcard, else the first of all; cluster-wide
    /// pairs before this node's own.
    pub fn choose(&self, host: Option<&str>) -> Option<Arc<Pair>> {
        // Every handshake asks: read under the locks, no copies.
        let cluster = self.cluster.read().unwrap_or_else(|p| p.into_inner());
        let local = self.pairs.read().unwrap_or_else(|p| p.into_inner());
        let pairs = || cluster.iter().map(|(_, p)| p).chain(local.iter());
        if let Some(host) = host.map(str::to_ascii_lowercase) {
            let exact = pairs().find(|p| p.names.contains(&host));
            let wild = || pairs().find(|p| p.names.iter().any(|n| matches(n, &host)));
            if let Some(p) = exact.or_else(wild) {
                return Some(p.clone());
            }
        }
        pairs().next().cloned()
    }

    fn set_cluster(&self, mut pairs: Vec<(String, Arc<Pair>)>) {
        pairs.sort_by(|a, b| (a.0 != "default", &a.0).cmp(&(b.0 != "default", &b.0)));
        *self.cluster.write().unwrap_or_else(|p| p.into_inner()) = pairs;
    }

    fn replace(&self, index: usize, pair: Pair) {
        let mut pairs = self.pairs.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = pairs.get_mut(index) {
            *slot = Arc::new(pair);
        }
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name()).map(|p| p.key.clone())
    }
}

/// A certificate and key given as files.
#[derive(Debug, Clone)]
pub struct FilePair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(PEM_BYTES_MAX as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > PEM_BYTES_MAX {
        bail!("{} is larger than {PEM_BYTES_MAX} bytes", path.display());
    }
    Ok(bytes)
}

/// Reads and checks one pair of files; also returns a hash of both
/// contents, to tell a change.
fn load_files(f: &FilePair) -> anyhow::Result<(Pair, blake3::Hash)> {
    let (cert, key) = (read_pem(&f.cert)?, read_pem(&f.key)?);
    let hash = contents_hash(&cert, &key);
    let pair = check_pair(&cert, &key, now_secs())
        .with_context(|| format!("{} with {}", f.cert.display(), f.key.display()))?;
    Ok((pair, hash))
}

fn contents_hash(cert: &[u8], key: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&(cert.len() as u64).to_le_bytes());
    h.update(cert);
    h.update(key);
    h.finalize()
}

/// The self-signed pair of a node without certificates: made once, kept in
/// `DATA/tls-self-signed.{crt,key}` so that a restart serves the same one.
fn self_signed(data_dir: &Path, hostname: &str, ips: &[std::net::IpAddr]) -> anyhow::Result<Pair> {
    let (cert_path, key_path) = (
        data_dir.join("tls-self-signed.crt"),
        data_dir.join("tls-self-signed.key"),
    );
    if let (Ok(cert), Ok(key)) = (read_pem(&cert_path), read_pem(&key_path))
        && let Ok(pair) = check_pair(&cert, &key, now_secs())
    {
        return Ok(pair);
    }
    let mut names = vec![hostname.to_owned(), "localhost".to_owned()];
    names.dedup();
    let mut params = rcgen::CertificateParams::new(names).context("self-signed certificate names")?;
    let mut ips = ips.to_vec();
    ips.push(std::net::Ipv4Addr::LOCALHOST.into());
    ips.sort();
    ips.dedup();
    for ip in ips {
        params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{hostname} (Quill self-signed)"));
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    crate::files::write_private(&key_path, key.serialize_pem().as_bytes())?;
    crate::files::write_private(&cert_path, cert.pem().as_bytes())?;
    check_pair(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), now_secs())
}

/// What the node's TLS listeners and STARTTLS use.
#[derive(Clone)]
pub struct Tls {
    pub certs: Arc<Certs>,
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The files behind `certs` (same order); empty: self-signed.
    files: Arc<Vec<FilePair>>,
}

impl Tls {
    /// Loads the files (every pair must be good: a bad one fails the start
    /// with its reason), or makes or reuses the self-signed pair.
    /// `ips`: the addresses the node serves, named in a self-signed
    /// certificate so that clients told to trust it can check it.
    pub fn load(
        files: Vec<FilePair>,
        data_dir: &Path,
        hostname: &str,
        ips: &[std::net::IpAddr],
    ) -> anyhow::Result<Tls> {
        let mut pairs = Vec::new();
        for f in &files {
            let (pair, _) = load_files(f).context("TLS certificate refused")?;
            info!(cert = %f.cert.display(), names = ?pair.names, fingerprint = %pair.fingerprint, "TLS certificate loaded");
            pairs.push(pair);
        }
        if pairs.is_empty() {
            let pair = self_signed(data_dir, hostname, ips)?;
            warn!(
                cert = %data_dir.join("tls-self-signed.crt").display(),
                names = ?pair.names,
                fingerprint = %pair.fingerprint,
                "no TLS certificate given (--tls-cert/--tls-key): serving a self-signed one; clients must be told to trust it"
            );
            pairs.push(pair);
        }
        let certs = Arc::new(Certs::new(pairs));
        let config = server_config(certs.clone())?;
        Ok(Tls {
            certs,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            files: Arc::new(files),
        })
    }

    /// Re-reads the certificate files every [`RELOAD_INTERVAL`] until
    /// `stop`; a changed pair that checks out is served from the next
    /// handshake on, one that does not is logged (once per content) and
    /// the pair served before stays. Reads by path, so a file replaced by
    /// rename (as certificate tools do) is seen.
    pub async fn watch_files(self, mut stop: watch::Receiver<bool>) {
        let mut seen: Vec<Option<blake3::Hash>> = self
            .files
            .iter()
            .map(|f| match (read_pem(&f.cert), read_pem(&f.key)) {
                (Ok(c), Ok(k)) => Some(contents_hash(&c, &k)),
                _ => None,
            })
            .collect();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
                _ = stop.changed() => return,
            }
            for (i, f) in self.files.iter().enumerate() {
                let Ok((cert, key)) = read_pem(&f.cert).and_then(|c| Ok((c, read_pem(&f.key)?))) else {
                    continue;
                };
                let hash = contents_hash(&cert, &key);
                if seen[i] == Some(hash) {
                    continue;
                }
                seen[i] = Some(hash);
                match check_pair(&cert, &key, now_secs()) {
                    Ok(pair) => {
                        info!(cert = %f.cert.display(), names = ?pair.names, fingerprint = %pair.fingerprint,
                            "TLS certificate reloaded");
                        self.certs.replace(i, pair);
                    }
                    Err(e) => warn!(cert = %f.cert.display(), error = %format!("{e:#}"),
                        "changed TLS certificate refused; still serving the one loaded before"),
                }
            }
        }
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("certs", &self.certs).finish()
    }
}

/// Follows the certificates stored in the cluster's replicated state: each
/// is checked again here before it is served (one that fails, e.g. expired
/// since it was set, is logged and the pair served before under its name
/// stays). Looks every [`CLUSTER_POLL`] at a version counter.
pub async fn watch_cluster(certs: Arc<Certs>, membership: membership::Membership, mut stop: watch::Receiver<bool>) {
    let mut seen = 0u64;
    loop {
        let version = membership.tls_version();
        if version != seen {
            seen = version;
            let stored = membership.tls_certs();
            let before = certs.cluster();
            let mut next = Vec::new();
            for (name, c) in &stored.certs {
                match check_pair(c.cert_pem.as_bytes(), c.key_pem.as_bytes(), now_secs()) {
                    Ok(pair) => {
                        let same = before
                            .iter()
                            .any(|(n, p)| n == name && p.fingerprint == pair.fingerprint);
                        if !same {
                            info!(%name, names = ?pair.names, fingerprint = %pair.fingerprint,
                                "cluster-wide TLS certificate served");
                        }
                        next.push((name.clone(), Arc::new(pair)));
                    }
                    Err(e) => {
                        warn!(%name, error = %format!("{e:#}"), "cluster-wide TLS certificate refused here");
                        if let Some(old) = before.iter().find(|(n, _)| n == name) {
                            next.push(old.clone());
                        }
                    }
                }
            }
            certs.set_cluster(next);
        }
        tokio::select! {
            _ = tokio::time::sleep(CLUSTER_POLL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How often a node looks for a change of the cluster-wide certificates.
pub const CLUSTER_POLL: Duration = Duration::from_millis(500);

fn server_config(certs: Arc<Certs>) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    Ok(config)
}

/// What a `Received:` header says of a session's TLS, e.g.
/// `TLSv1_3 TLS13_AES_256_GCM_SHA384`.
pub fn describe(conn: &rustls::ServerConnection) -> String {
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "TLS".into());
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    format!("{version} {suite}").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair_pem(names: &[&str], not_after_year: i32) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn pairs_are_checked() {
        let now = now_secs();
        let (cert, key) = pair_pem(&["mail.example.org", "*.example.net"], 2035);
        let good = check_pair(cert.as_bytes(), key.as_bytes(), now).unwrap();
        assert_eq!(good.names, ["mail.example.org", "*.example.net"]);
        let (_, other_key) = pair_pem(&["x"], 2035);
        let e = check_pair(cert.as_bytes(), other_key.as_bytes(), now).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        let (old, old_key) = pair_pem(&["old.example.org"], 2021);
        let e = check_pair(old.as_bytes(), old_key.as_bytes(), now).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        let e = check_pair(b"garbage", key.as_bytes(), now).unwrap_err();
        assert!(e.to_string().contains("CERTIFICATE"), "{e}");
        let e = check_pair(cert.as_bytes(), b"", now).unwrap_err();
        assert!(e.to_string().contains("private key"), "{e}");
    }

    #[test]
    fn sni_chooses_the_pair() {
        let now = now_secs();
        let load = |names: &[&str]| {
            let (c, k) = pair_pem(names, 2035);
            check_pair(c.as_bytes(), k.as_bytes(), now).unwrap()
        };
        let certs = Certs::new(vec![
            load(&["a.example.org"]),
            load(&["*.example.net", "b.example.org"]),
        ]);
        let fp = |host: Option<&str>| certs.choose(host).unwrap().names[0].clone();
        assert_eq!(fp(None), "a.example.org");
        assert_eq!(fp(Some("B.example.org")), "*.example.net");
        assert_eq!(fp(Some("mx.example.net")), "*.example.net");
        // A wildcard covers one label only.
        assert_eq!(fp(Some("a.b.example.net")), "a.example.org");
        assert_eq!(fp(Some("unknown.test")), "a.example.org");
        assert!(matches("*.example.net", "x.example.net"));
        assert!(!matches("*.example.net", "example.net"));
    }
}
