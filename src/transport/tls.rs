//! TLS for both ports (rustls, with the `ring` provider the rest of the build uses): the
//! certificate chain and key from PEM files, re-read when the files change, and with a client
//! CA, client certificates required and verified, their subject becoming the caller's identity.
//!
//! The files are looked at (their modification times and sizes) at most once a second, when a
//! connection arrives; a change builds a new server configuration for the connections that come
//! after it, while those already open keep theirs — a certificate rotated by cert-manager (a
//! Secret's files replaced) drops no connection. Files that cannot be used (half-written, a key
//! that does not match) leave the previous configuration in place, with a warning.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use super::RateLimited;
use crate::config::TlsFiles;

/// How often, at most, the files are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The crypto provider of every TLS configuration the agent makes: `ring`, the one the
/// Kubernetes client is built with. The first call also installs it as the process default,
/// which the Kubernetes client's own configuration uses: the Redis client's rustls comes with
/// `aws-lc-rs` as well, and with two providers in the build rustls picks neither by itself.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = rustls::crypto::ring::default_provider();
            // Already installed (by a test, say): that one stays the process default.
            let _ = provider.clone().install_default();
            Arc::new(provider)
        })
        .clone()
}

/// The caller's identity from its verified client certificate: the certificate subject's common
/// name (CN), else its first DNS name. Every request of a connection that presented one carries
/// it in its extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub String);

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use {}: {reason}", path.display())]
pub struct TlsError {
    /// The file at fault.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// A port's TLS configuration, rebuilt from the files when they change.
pub struct Tls {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    current: Mutex<Current>,
    reload_failed: RateLimited,
}

struct Current {
    config: Arc<ServerConfig>,
    stamps: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
}

impl Tls {
    /// Loads the files, offering the `alpn` protocols (most preferred first).
    pub fn load(files: TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let stamps = stamps(&files);
        let config = Arc::new(server_config(&files, &alpn)?);
        Ok(Self {
            files,
            alpn,
            current: Mutex::new(Current {
                config,
                stamps,
                checked: Instant::now(),
            }),
            reload_failed: RateLimited::default(),
        })
    }

    /// The configuration for a new connection: rebuilt first if the files changed.
    pub fn config(&self) -> Arc<ServerConfig> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.checked.elapsed() >= CHECK_EVERY {
            current.checked = Instant::now();
            let stamps = stamps(&self.files);
            if stamps != current.stamps {
                match server_config(&self.files, &self.alpn) {
                    Ok(config) => {
                        tracing::info!(
                            cert = %self.files.cert.display(),
                            "TLS files changed: new connections get the new certificate"
                        );
                        current.config = Arc::new(config);
                        current.stamps = stamps;
                    }
                    // Perhaps half-written: try again on the next look, with the old meanwhile.
                    Err(err) => {
                        if let Some(times) = self.reload_failed.occurred() {
                            tracing::warn!(error = %err, times, "TLS files changed but cannot be used; keeping the previous ones");
                        }
                    }
                }
            }
        }
        Arc::clone(&current.config)
    }
}

/// What tells a file changed: its modification time and size (`None`: unreadable).
fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        // `metadata` follows symbolic links: a Secret volume swaps a link to a new directory.
        let metadata = std::fs::metadata(path).ok()?;
        Some((metadata.modified().ok()?, metadata.len()))
    })
    .collect()
}

fn error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| error(path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| error(path, err))?;
    if certs.is_empty() {
        return Err(error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn server_config(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|err| error(&files.key, err))?;
    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| error(&files.cert, err))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path)? {
                roots.add(cert).map_err(|err| error(path, err))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| error(path, err))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|err| {
        error(
            &files.key,
            format!("{err} (does the key match the certificate?)"),
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// The identity a verified client certificate names: its subject's common name, else its first
/// DNS name.
pub fn identity(certificate: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let certificate = webpki::EndEntityCert::try_from(certificate).ok()?;
    common_name(certificate.subject())
        .or_else(|| certificate.valid_dns_names().next().map(str::to_owned))
        .filter(|name| !name.is_empty())
        .map(PeerIdentity)
}

/// The first common name (OID 2.5.4.3) in the content of a DER `Name`: a sequence of SETs of
/// SEQUENCEs { OID, value }.
fn common_name(mut name: &[u8]) -> Option<String> {
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (tag, mut set, rest) = der(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (tag, attribute, rest) = der(set)?;
            set = rest;
            if tag != 0x30 {
                return None;
            }
            let (tag, oid, value) = der(attribute)?;
            if tag == 0x06 && oid == COMMON_NAME {
                let (tag, text, _) = der(value)?;
                return match tag {
                    // UTF8String, PrintableString, TeletexString (Latin-1 in practice), IA5String
                    0x0C | 0x13 | 0x16 => String::from_utf8(text.to_vec()).ok(),
                    0x14 => Some(text.iter().map(|&b| char::from(b)).collect()),
                    // BMPString: UTF-16 big-endian
                    0x1E => String::from_utf16(
                        &text
                            .chunks_exact(2)
                            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                            .collect::<Vec<_>>(),
                    )
                    .ok(),
                    _ => None,
                };
            }
        }
    }
    None
}

/// One DER element: (tag, content, what follows). Definite lengths only, as DER requires.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let bytes = usize::from(first & 0x7F);
        if bytes == 0 || bytes > 4 || input.len() < bytes {
            return None;
        }
        let (length, rest) = input.split_at(bytes);
        input = rest;
        length
            .iter()
            .fold(0usize, |length, &b| (length << 8) | usize::from(b))
    };
    if input.len() < length {
        return None;
    }
    let (content, rest) = input.split_at(length);
    Some((tag, content, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(params: rcgen::CertificateParams) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_identity_is_the_subject_common_name_else_the_first_dns_name() {
        let mut named = rcgen::CertificateParams::new(vec!["ignored.example".into()]).unwrap();
        named
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Team");
        named
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        assert_eq!(
            identity(&certificate(named)),
            Some(PeerIdentity("alice".into()))
        );

        let mut unnamed = rcgen::CertificateParams::new(vec!["bob.example".into()]).unwrap();
        unnamed.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(
            identity(&certificate(unnamed)),
            Some(PeerIdentity("bob.example".into()))
        );

        let mut nothing = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        nothing.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(identity(&certificate(nothing)), None);
    }

    #[test]
    fn malformed_der_names_no_identity_and_never_panics() {
        for input in [
            &[][..],
            &[0x31],
            &[0x31, 0x85, 0, 0, 0, 0, 1],
            &[0x31, 0x03, 0x30, 0x01],
            &[0x31, 0x80],
            &[0x30, 0x00],
        ] {
            assert_eq!(common_name(input), None, "{input:?}");
        }
    }
}
