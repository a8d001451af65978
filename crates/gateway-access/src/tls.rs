//! `[server.tls]`: HTTPS on the data-plane listener, with certificates that follow their files.
//!
//! The server certificate is served by a resolver holding an `ArcSwap<CertifiedKey>`: a task
//! polls the cert and key files' modification stamps and swaps in a new pair when they change,
//! so a renewed certificate (cert-manager, certbot) is used by the next handshake without a
//! restart. A pair that does not load, or whose key does not match its certificate, is logged and
//! the old one kept: a half-written renewal must not take the listener down.

use arc_swap::ArcSwap;
use gateway_core::config::ConfigError;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

/// `[server.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates (mTLS). Needed unless
    /// `client_auth = "none"`. Default: none.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Whether clients present a certificate: `none`, `optional` (verified when presented) or
    /// `required`. Default `none`.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// How often the cert and key files are checked for a change. Default 5 s.
    #[serde(default = "default_reload_interval_secs")]
    pub reload_interval_secs: u64,
}

fn default_reload_interval_secs() -> u64 {
    5
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    None,
    Optional,
    Required,
}

impl TlsConfig {
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        match (self.client_auth, &self.client_ca) {
            (ClientAuth::None, Some(_)) => errors.push(ConfigError::new(
                "server.tls.client_ca",
                "is set but client_auth is \"none\": set client_auth to \"optional\" or \"required\"",
            )),
            (ClientAuth::Optional | ClientAuth::Required, None) => errors.push(ConfigError::new(
                "server.tls.client_auth",
                "needs server.tls.client_ca to verify client certificates",
            )),
            _ => {}
        }
        if self.reload_interval_secs == 0 {
            errors.push(ConfigError::new(
                "server.tls.reload_interval_secs",
                "must be at least 1",
            ));
        }
        errors
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("the key does not match the certificate: {0}")]
    Mismatch(rustls::Error),
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
}

/// Accepts TLS connections with the configured certificate, protocol versions and ALPN.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<ReloadingCert>,
    reload_interval: Duration,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("cert", &self.resolver.cert_path)
            .finish_non_exhaustive()
    }
}

/// ALPN ids in preference order: h2 first, so clients that speak it multiplex.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

impl TlsAcceptor {
    /// Loads the certificate, key and client CA: a start-up error if any is unusable.
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = Arc::new(ReloadingCert::load(
            config.cert.clone(),
            config.key.clone(),
            &provider,
        )?);
        let verifier = client_verifier(config, &provider)?;
        // TLS 1.0 and 1.1 are not implemented by rustls at all; naming 1.2 and 1.3 here keeps
        // that a visible decision.
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            resolver,
            reload_interval: Duration::from_secs(config.reload_interval_secs.max(1)),
        })
    }

    /// The handshake; the caller bounds it with a timeout.
    pub fn accept<IO>(&self, stream: IO) -> tokio_rustls::Accept<IO>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.acceptor.accept(stream)
    }

    /// Checks the cert and key files every `reload_interval_secs` and swaps in a changed pair.
    /// The task ends when every clone of this acceptor is gone.
    pub fn spawn_reloader(&self) -> tokio::task::JoinHandle<()> {
        let resolver = Arc::downgrade(&self.resolver);
        let interval = self.reload_interval;
        tokio::spawn(reload_loop(resolver, interval))
    }

    /// Re-reads the files now if they changed; `true` when a new pair was installed.
    pub fn reload_if_changed(&self) -> bool {
        self.resolver.reload_if_changed()
    }
}

async fn reload_loop(resolver: Weak<ReloadingCert>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(resolver) = resolver.upgrade() else {
            return;
        };
        // File reads are small and rare; blocking the worker for them is cheaper than a hop.
        resolver.reload_if_changed();
    }
}

fn client_verifier(
    config: &TlsConfig,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let Some(ca_path) = &config.client_ca else {
        return Ok(WebPkiClientVerifier::no_client_auth());
    };
    if config.client_auth == ClientAuth::None {
        return Ok(WebPkiClientVerifier::no_client_auth());
    }
    let mut roots = RootCertStore::empty();
    let pem = read(ca_path)?;
    for cert in certs(ca_path, &pem)? {
        roots
            .add(cert)
            .map_err(|err| TlsError::ClientCa(format!("{}: {err}", ca_path.display())))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if config.client_auth == ClientAuth::Optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|err| TlsError::ClientCa(err.to_string()))
}

/// Modification time and length: a renewal changes at least one of them.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The certificate resolver: every handshake reads the current pair.
struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    stamps: Mutex<(Stamp, Stamp)>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    fn load(
        cert_path: PathBuf,
        key_path: PathBuf,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let stamps = (stamp(&cert_path), stamp(&key_path));
        let pair = load_pair(&cert_path, &key_path, provider)?;
        Ok(Self {
            cert_path,
            key_path,
            provider: provider.clone(),
            current: ArcSwap::from_pointee(pair),
            stamps: Mutex::new(stamps),
        })
    }

    fn reload_if_changed(&self) -> bool {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        {
            let mut seen = self
                .stamps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *seen == now {
                return false;
            }
            // Recorded even when the load fails: the next attempt waits for the next change
            // (the other half of a renewal written file by file) instead of logging every poll.
            *seen = now;
        }
        match load_pair(&self.cert_path, &self.key_path, &self.provider) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                true
            }
            Err(err) => {
                tracing::warn!(
                    cert = %self.cert_path.display(),
                    error = %err,
                    "new TLS certificate not usable; keeping the current one"
                );
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<CertifiedKey, TlsError> {
    let chain = certs(cert_path, &read(cert_path)?)?;
    let key = PrivateKeyDer::from_pem_slice(&read(key_path)?).map_err(|err| TlsError::Pem {
        path: key_path.to_owned(),
        message: err.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn config(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
            client_auth: ClientAuth::None,
            reload_interval_secs: 1,
        }
    }

    fn leaf(acceptor: &TlsAcceptor) -> Vec<u8> {
        acceptor.resolver.current.load().cert[0].to_vec()
    }

    #[test]
    fn a_bad_new_pair_keeps_the_old_one_and_a_good_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed("one.test");
        std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), &key).unwrap();
        let acceptor = TlsAcceptor::new(&config(dir.path())).unwrap();
        let first = leaf(&acceptor);
        assert!(!acceptor.reload_if_changed(), "nothing changed yet");

        // A new certificate whose key is still the old one: refused, the old pair stays.
        let (cert2, key2) = self_signed("two.test");
        std::fs::write(dir.path().join("cert.pem"), &cert2).unwrap();
        assert!(!acceptor.reload_if_changed());
        assert_eq!(leaf(&acceptor), first);

        // Garbage is refused too.
        std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
        assert!(!acceptor.reload_if_changed());
        assert_eq!(leaf(&acceptor), first);

        std::fs::write(dir.path().join("key.pem"), &key2).unwrap();
        assert!(acceptor.reload_if_changed());
        assert_ne!(leaf(&acceptor), first);
    }

    #[test]
    fn a_start_with_a_mismatched_pair_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed("one.test");
        let (_, other_key) = self_signed("two.test");
        std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), &other_key).unwrap();
        let err = TlsAcceptor::new(&config(dir.path())).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch(_)), "{err}");
        std::fs::remove_file(dir.path().join("cert.pem")).unwrap();
        let err = TlsAcceptor::new(&config(dir.path())).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
    }

    #[test]
    fn client_auth_needs_a_ca_and_a_ca_needs_client_auth() {
        let mut tls = config(Path::new("/x"));
        assert!(tls.validate().is_empty());
        tls.client_auth = ClientAuth::Required;
        assert_eq!(tls.validate().len(), 1);
        tls.client_ca = Some("/x/ca.pem".into());
        assert!(tls.validate().is_empty());
        tls.client_auth = ClientAuth::None;
        assert_eq!(tls.validate().len(), 1);
    }
}
