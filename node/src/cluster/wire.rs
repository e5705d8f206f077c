//! The cluster wire: QUIC (quinn) between nodes with mutual TLS (rustls)
//! under a cluster CA, and a versioned, size-limited request/reply framing.
//!
//! - The first node creates the cluster CA ([`ClusterCa`]) in its data
//!   directory and a join token. The token carries the CA's fingerprint, so
//!   a joining node can check whom it talks to before it has any
//!   certificate, and a secret that proves it may join.
//! - A member connects with its node certificate; the server requires one
//!   signed by the cluster CA for everything except the join request.
//! - One bidirectional stream per request, framed by the protocol cores
//!   (`quill_proto::wire`: `version:u16le deadline:u32le len:u32le
//!   bincode(request)`), answered the same way (deadline 0); every read
//!   has a size limit. Each connection speaks the newest cluster protocol
//!   both sides offer in ALPN ([`Protocol`]: a node of the previous
//!   release gets that release's protocol), and carries only its messages. **The deadline contract**: `deadline` is the
//!   caller's budget in milliseconds; a member's request is served within
//!   it (at most [`SERVE_DEADLINE_MAX`]), so a large copy the caller gave
//!   a minute is not cut at the server after two seconds. A peer without a
//!   cluster certificate gets [`RPC_TIMEOUT`] whatever it asks for.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use quill_proto::wire::{FRAME_BYTES_MAX, HEADER_BYTES, Protocol, decode, decode_body, encode, header};
use quinn::{ClientConfig, Connection, Endpoint, ServerConfig};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::files::write_private;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The ALPN names of `protocols`, in their order: a node offers every
/// protocol it speaks ([`Protocol::ALL`], newest first), and TLS takes the
/// newest both sides know.
fn alpn(protocols: &[Protocol]) -> Vec<Vec<u8>> {
    protocols.iter().map(|p| p.alpn().to_vec()).collect()
}

/// The protocol a connection's handshake settled on. Both sides always
/// offer ALPN (a handshake without a common protocol fails), so a
/// connection without one cannot happen; it would be taken as the oldest.
pub fn protocol_of(conn: &Connection) -> Protocol {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .and_then(|name| Protocol::from_alpn(&name))
        .unwrap_or(Protocol::V1)
}

/// Who sent a request: whether it showed a cluster certificate, and the
/// protocol of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub member: bool,
    pub protocol: Protocol,
}
/// The most a member may ask a server to spend on one request (reading
/// the request, handling it, writing the reply).
pub const SERVE_DEADLINE_MAX: Duration = Duration::from_secs(300);
/// The name every node certificate carries and every client asks for:
/// nodes are told apart by their Raft id, not by DNS names.
pub const NODE_SERVER_NAME: &str = "quill-node";
/// Every request is answered within this time or fails (and the caller
/// drops the connection, which may be stale). Two seconds carry a snapshot
/// chunk over any sane link and keep a dead peer from stalling a vote.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Quill cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Ten years: a cluster outlives any one node.
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    p
}

fn fingerprint(der: &[u8]) -> String {
    blake3::hash(der).to_hex()[..32].to_owned()
}

/// The cluster's certificate authority: signs node certificates.
pub struct ClusterCa {
    cert: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// A node's certificate (signed by the CA), its key, and the CA certificate.
#[derive(Debug)]
pub struct NodeIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl ClusterCa {
    pub fn create() -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        Ok(ClusterCa {
            cert: cert.der().clone(),
            key,
        })
    }

    /// Loads `ca.der` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let cert = CertificateDer::from(std::fs::read(dir.join("ca.der")).context("reading ca.der")?);
        let key_pem = std::fs::read_to_string(dir.join("ca.key")).context("reading ca.key")?;
        Ok(ClusterCa {
            cert,
            key: KeyPair::from_pem(&key_pem)?,
        })
    }

    /// Whether `key_pem` is the private key of the CA certificate `ca_der`
    /// (its public key appears in the certificate's key info).
    pub fn key_matches(ca_der: &[u8], key_pem: &str) -> bool {
        let Ok(key) = KeyPair::from_pem(key_pem) else {
            return false;
        };
        let public = key.public_key_raw();
        !public.is_empty() && ca_der.windows(public.len()).any(|w| w == public)
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write_private(&dir.join("ca.key"), self.key.serialize_pem().as_bytes())?;
        Ok(write_private(&dir.join("ca.der"), &self.cert)?)
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// What a join token names the CA by.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// A new key and certificate for a node.
    pub fn issue(&self, node_name: &str) -> anyhow::Result<NodeIdentity> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![NODE_SERVER_NAME.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name);
        p.distinguished_name = dn;
        p.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok(NodeIdentity {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            ca: self.cert.clone(),
        })
    }
}

impl NodeIdentity {
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write_private(&dir.join("node.key"), self.key.secret_pkcs8_der())?;
        write_private(&dir.join("node.der"), &self.cert)?;
        Ok(write_private(&dir.join("ca.der"), &self.ca)?)
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        Ok(NodeIdentity {
            cert: CertificateDer::from(std::fs::read(dir.join("node.der")).context("reading node.der")?),
            key: PrivatePkcs8KeyDer::from(std::fs::read(dir.join("node.key")).context("reading node.key")?),
            ca: CertificateDer::from(std::fs::read(dir.join("ca.der")).context("reading ca.der")?),
        })
    }

    fn roots(&self) -> anyhow::Result<Arc<rustls::RootCertStore>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone(), self.ca.clone()]
    }
}

/// `quill1.<ca fingerprint>.<secret>`: what a node needs to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: String,
    pub secret: String,
}

impl JoinToken {
    pub fn new(ca: &ClusterCa, secret: String) -> Self {
        JoinToken {
            ca_fingerprint: ca.fingerprint(),
            secret,
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let mut it = s.trim().splitn(3, '.');
        match (it.next(), it.next(), it.next()) {
            (Some("quill1"), Some(fp), Some(secret))
                if fp.len() == 32 && fp.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty() =>
            {
                Ok(JoinToken {
                    ca_fingerprint: fp.to_ascii_lowercase(),
                    secret: secret.to_owned(),
                })
            }
            _ => bail!("malformed join token (expected quill1.<32 hex>.<secret>)"),
        }
    }

    /// Compares secrets without leaking, through timing, how much matched.
    pub fn secret_matches(&self, given: &str) -> bool {
        blake3::hash(self.secret.as_bytes()) == blake3::hash(given.as_bytes())
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "quill1.{}.{}", self.ca_fingerprint, self.secret)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn quic_transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(
        Duration::from_secs(10)
            .try_into()
            .expect("10 s is a valid idle timeout"),
    ));
    Arc::new(t)
}

/// The server side: presents the node certificate; asks for a client
/// certificate from the cluster CA but lets a joiner without one connect
/// (such a connection may only send the join request).
pub fn server_config(id: &NodeIdentity) -> anyhow::Result<ServerConfig> {
    server_config_speaking(id, &Protocol::ALL)
}

fn server_config_speaking(id: &NodeIdentity, protocols: &[Protocol]) -> anyhow::Result<ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(id.roots()?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain(), PrivateKeyDer::Pkcs8(id.key.clone_key()))?;
    tls.alpn_protocols = alpn(protocols);
    let mut cfg = ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(tls)?));
    cfg.transport_config(quic_transport());
    Ok(cfg)
}

/// A member's client side: trusts only the cluster CA, shows its own cert.
pub fn member_client_config(id: &NodeIdentity) -> anyhow::Result<ClientConfig> {
    member_client_config_speaking(id, &Protocol::ALL)
}

fn member_client_config_speaking(id: &NodeIdentity, protocols: &[Protocol]) -> anyhow::Result<ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain(), PrivateKeyDer::Pkcs8(id.key.clone_key()))?;
    tls.alpn_protocols = alpn(protocols);
    let mut cfg = ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    cfg.transport_config(quic_transport());
    Ok(cfg)
}

/// A joiner's client side: no certificate yet; trusts a server whose chain
/// holds the CA named by the join token, and that CA only.
pub fn joiner_client_config(token: &JoinToken) -> anyhow::Result<ClientConfig> {
    let verifier = Arc::new(FingerprintVerifier {
        fingerprint: token.ca_fingerprint.clone(),
        provider: provider(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = alpn(&Protocol::ALL);
    Ok(ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    )))
}

/// Accepts a server chain only if it includes the CA with the expected
/// fingerprint and the end-entity certificate verifies against that CA.
#[derive(Debug)]
struct FingerprintVerifier {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| rustls::Error::General("server is not in the cluster named by the join token".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether the peer of a server-side connection showed a cluster certificate
/// (the TLS layer has already checked it against the CA).
pub fn peer_is_member(conn: &Connection) -> bool {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .is_some_and(|chain| !chain.is_empty())
}

/// Sends one request on a new stream and waits (bounded) for its reply.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(conn: &Connection, req: &Req) -> anyhow::Result<Resp> {
    call_within(conn, req, RPC_TIMEOUT).await
}

/// [`call`] with its own deadline (for requests that carry a message body).
pub async fn call_within<Req: Serialize, Resp: DeserializeOwned>(
    conn: &Connection,
    req: &Req,
    deadline: Duration,
) -> anyhow::Result<Resp> {
    let protocol = protocol_of(conn);
    let frame = encode(req, deadline, protocol)?;
    tokio::time::timeout(deadline, async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&frame).await?;
        send.finish()?;
        let reply = recv.read_to_end(FRAME_BYTES_MAX + HEADER_BYTES).await?;
        Ok::<_, anyhow::Error>(decode(&reply, protocol)?)
    })
    .await
    .map_err(|_| anyhow!("no reply within {deadline:?}"))?
}

/// Connects to a peer's cluster address.
pub async fn connect(endpoint: &Endpoint, config: ClientConfig, addr: SocketAddr) -> anyhow::Result<Connection> {
    let connecting = endpoint.connect_with(config, addr, NODE_SERVER_NAME)?;
    let conn = tokio::time::timeout(RPC_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))??;
    Ok(conn)
}

/// Serves the requests of one accepted connection until it closes:
/// `handle(peer, request)` gives each reply, within the deadline the
/// request carries (members; at most [`SERVE_DEADLINE_MAX`]) or
/// [`RPC_TIMEOUT`] (anyone else). A handler cut by its deadline is dropped,
/// so whatever it holds must be released by guards.
pub async fn serve_connection<Req, Resp, F, Fut>(conn: Connection, handle: F)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Peer, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Resp> + Send,
{
    let peer = Peer {
        member: peer_is_member(&conn),
        protocol: protocol_of(&conn),
    };
    let member = peer.member;
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let result = async {
                // The header (and with it the deadline) comes first.
                let mut h = [0u8; HEADER_BYTES];
                tokio::time::timeout(RPC_TIMEOUT, recv.read_exact(&mut h))
                    .await
                    .map_err(|_| anyhow!("no request header within {RPC_TIMEOUT:?}"))??;
                let (asked, len) = header(&h, peer.protocol)?;
                let deadline = if member {
                    asked.min(SERVE_DEADLINE_MAX)
                } else {
                    RPC_TIMEOUT
                };
                tokio::time::timeout(deadline, async {
                    let body = recv.read_to_end(len).await?;
                    let req: Req = decode_body(&body, len)?;
                    let reply = encode(&handle(peer, req).await, Duration::ZERO, peer.protocol)?;
                    send.write_all(&reply).await?;
                    send.finish()?;
                    Ok::<_, anyhow::Error>(())
                })
                .await
                .map_err(|_| anyhow!("request not served within its deadline of {deadline:?}"))?
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "cluster request failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    enum Req {
        Join(String),
        Echo(u32),
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    enum Resp {
        Ok(u32),
        Welcome,
        Refused(String),
    }

    fn server(id: &NodeIdentity) -> Endpoint {
        let ep = Endpoint::server(server_config(id).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let accept = ep.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    serve_connection(conn, |peer: Peer, req: Req| async move {
                        match (peer.member, req) {
                            (_, Req::Join(_)) => Resp::Welcome,
                            (true, Req::Echo(n)) => Resp::Ok(n),
                            (false, Req::Echo(_)) => Resp::Refused("members only".into()),
                        }
                    })
                    .await
                });
            }
        });
        ep
    }

    #[tokio::test]
    async fn mutual_tls_join_and_refusals() {
        let ca = ClusterCa::create().unwrap();
        let token = JoinToken::new(&ca, "s3cret".into());
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        assert!(JoinToken::parse("quill1.zz.x").is_err());
        let a = ca.issue("a").unwrap();
        let b = ca.issue("b").unwrap();
        let srv = server(&a);
        let addr = srv.local_addr().unwrap();
        let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

        // A member with a cluster certificate.
        let conn = connect(&client, member_client_config(&b).unwrap(), addr).await.unwrap();
        assert_eq!(call::<Req, Resp>(&conn, &Req::Echo(7)).await.unwrap(), Resp::Ok(7));

        // A joiner with the right token: may join, nothing else.
        let conn = connect(&client, joiner_client_config(&token).unwrap(), addr)
            .await
            .unwrap();
        assert_eq!(
            call::<Req, Resp>(&conn, &Req::Join("x".into())).await.unwrap(),
            Resp::Welcome
        );
        assert!(matches!(
            call::<Req, Resp>(&conn, &Req::Echo(1)).await.unwrap(),
            Resp::Refused(_)
        ));

        // A joiner whose token names another cluster's CA does not trust this server.
        let other = ClusterCa::create().unwrap();
        let wrong = JoinToken::new(&other, "s3cret".into());
        assert!(
            connect(&client, joiner_client_config(&wrong).unwrap(), addr)
                .await
                .is_err()
        );

        // A node certified by another CA is refused by the server.
        let stranger = other.issue("c").unwrap();
        // It trusts our CA (so that only the server's check can refuse it).
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(a.roots().unwrap())
            .with_client_auth_cert(stranger.chain(), PrivateKeyDer::Pkcs8(stranger.key.clone_key()))
            .unwrap();
        tls.alpn_protocols = alpn(&Protocol::ALL);
        let cfg = ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let refused = async {
            let conn = connect(&client, cfg, addr).await?;
            call::<Req, Resp>(&conn, &Req::Echo(1)).await
        }
        .await;
        assert!(
            refused.is_err(),
            "a certificate from another CA must not get through: {refused:?}"
        );
    }

    /// A node of the previous release offers only its protocol (V1), on
    /// either side of a connection: the new node speaks V1 with it, in
    /// V1's frames; two new nodes speak the newest.
    #[tokio::test]
    async fn each_connection_speaks_the_newest_protocol_both_sides_know() {
        let ca = ClusterCa::create().unwrap();
        let (a, b) = (ca.issue("a").unwrap(), ca.issue("b").unwrap());
        let serve = |cfg: ServerConfig| {
            let ep = Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = ep.local_addr().unwrap();
            tokio::spawn(async move {
                while let Some(incoming) = ep.accept().await {
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        serve_connection(conn, |peer: Peer, req: Req| async move {
                            match req {
                                // Says which protocol it heard the request in.
                                Req::Echo(_) => Resp::Ok(peer.protocol.frame_version().into()),
                                Req::Join(_) => Resp::Welcome,
                            }
                        })
                        .await
                    });
                }
            });
            addr
        };
        let new_server = serve(server_config(&a).unwrap());
        let old_server = serve(server_config_speaking(&a, &[Protocol::V1]).unwrap());
        let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let cases = [
            (new_server, member_client_config(&b).unwrap(), Protocol::V2),
            (
                new_server,
                member_client_config_speaking(&b, &[Protocol::V1]).unwrap(),
                Protocol::V1,
            ),
            (old_server, member_client_config(&b).unwrap(), Protocol::V1),
        ];
        for (addr, cfg, want) in cases {
            let conn = connect(&client, cfg, addr).await.unwrap();
            assert_eq!(protocol_of(&conn), want);
            let heard = call::<Req, Resp>(&conn, &Req::Echo(1)).await.unwrap();
            assert_eq!(heard, Resp::Ok(want.frame_version().into()));
        }
    }

    /// A handler that needs longer than `RPC_TIMEOUT` but less than its
    /// caller's deadline is answered; a caller with a shorter deadline is
    /// told so at its deadline.
    #[tokio::test]
    async fn the_callers_deadline_governs() {
        let ca = ClusterCa::create().unwrap();
        let (a, b) = (ca.issue("a").unwrap(), ca.issue("b").unwrap());
        let srv = Endpoint::server(server_config(&a).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = srv.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = srv.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    serve_connection(conn, |_peer: Peer, req: Req| async move {
                        tokio::time::sleep(RPC_TIMEOUT + Duration::from_millis(800)).await;
                        match req {
                            Req::Echo(n) => Resp::Ok(n),
                            Req::Join(_) => Resp::Welcome,
                        }
                    })
                    .await
                });
            }
        });
        let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = connect(&client, member_client_config(&b).unwrap(), addr).await.unwrap();
        let slow = call_within::<Req, Resp>(&conn, &Req::Echo(3), RPC_TIMEOUT + Duration::from_secs(3)).await;
        assert_eq!(slow.unwrap(), Resp::Ok(3));
        let short = call_within::<Req, Resp>(&conn, &Req::Echo(4), Duration::from_millis(500)).await;
        assert!(short.unwrap_err().to_string().contains("no reply within"));
    }
}
