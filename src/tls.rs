//! TLS for the mail connections (IMAP, SMTP): which server certificates are trusted, and errors a person
//! can act on.
//!
//! What is trusted, in this order:
//!
//! 1. `<section>.tls_fingerprint = "sha256:…"`: the server's certificate whose SHA-256 (of its DER) is
//!    that, and no other, whoever signed it. The pin is the server's identity, so its names and dates
//!    are not looked at (as fetchmail's `sslfingerprint`). The handshake's signatures are still checked:
//!    the server must hold the pinned certificate's key.
//! 2. `<section>.ca_file`: a certificate the server presents that is itself in the file is trusted as
//!    itself, whatever its basic constraints say (a self-signed certificate made with `openssl req -x509`
//!    says CA:TRUE), as `openssl s_client -CAfile`, fetchmail and mbsync do; its names (subjectAltName,
//!    or the subject's CN when it has no subjectAltName) must give the host, and its dates must hold.
//!    Any other certificate must chain to a CA in the file (webpki, as any TLS client).
//! 3. Neither: the system's CAs (rustls-platform-verifier).
//!
//! When the server's certificate is refused, the verifier's error carries what a person needs (the
//! certificate's names, dates, fingerprint), and `explain_handshake` makes the sentence.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

/// What a connection trusts.
#[derive(Debug, Clone, Copy)]
pub struct Trust<'a> {
    /// The config section, for messages: "imap" or "email".
    pub section: &'static str,
    /// `<section>.ca_file`: CAs, or the server's own certificate.
    pub ca_file: Option<&'a Path>,
    /// `<section>.tls_fingerprint`: "sha256:<hex>".
    pub fingerprint: Option<&'a str>,
}

/// Reads a `tls_fingerprint`: 64 hex digits (SHA-256), in any case, with or without a `sha256:` prefix
/// and colons between the byte pairs (as `openssl x509 -noout -fingerprint -sha256` prints them).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let expected = "expected \"sha256:\" and 64 hex digits, colons between pairs allowed, as \
                    `openssl x509 -noout -fingerprint -sha256 -in cert.pem` prints";
    let t = text.trim();
    let t = t.strip_prefix("SHA256 Fingerprint=").unwrap_or(t);
    let t = match t.split_once(':') {
        Some((algo, rest)) if algo.eq_ignore_ascii_case("sha256") => rest,
        Some((algo, _)) if algo.len() > 2 && algo.chars().all(|c| c.is_ascii_alphanumeric()) => {
            return Err(format!(
                "{algo:?} fingerprints are not supported: {expected}"
            ));
        }
        _ => t,
    };
    let digits: String = if t.contains(':') {
        let pairs: Vec<&str> = t.split(':').collect();
        if pairs.iter().any(|p| p.len() != 2) {
            return Err(expected.to_string());
        }
        pairs.concat()
    } else {
        t.to_string()
    };
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(expected.to_string());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out).map_err(|_| expected.to_string())?;
    Ok(out)
}

/// A fingerprint as config takes it: "sha256:" and lower-case hex.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(fp))
}

/// The SHA-256 of a certificate's DER.
pub fn fingerprint_of(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

/// Why a server's certificate was refused; carried inside the rustls error to `explain_handshake`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not signed by a trusted CA (and not itself listed in ca_file); `self_signed` when its issuer is
    /// its subject.
    UnknownIssuer {
        fingerprint: [u8; 32],
        self_signed: bool,
    },
    /// Its names do not give the host.
    NameMismatch { names: Vec<String> },
    /// Expired at `not_after` (seconds since the epoch).
    Expired {
        not_after: i64,
        fingerprint: [u8; 32],
    },
    /// Not valid before `not_before`.
    NotYetValid { not_before: i64 },
    /// Not the pinned certificate.
    PinMismatch {
        expected: [u8; 32],
        presented: [u8; 32],
    },
    /// Revoked by its CA.
    Revoked,
    /// Not meant for TLS servers (extended key usage).
    WrongPurpose,
    /// Anything else, as a short phrase.
    Other(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sentence("the server", "<section>", None))
    }
}

impl std::error::Error for Refusal {}

fn date(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| secs.to_string())
}

impl Refusal {
    /// The sentence about the certificate of `who` ("host:port"), for config section `section`.
    fn sentence(&self, who: &str, section: &str, ca_file: Option<&Path>) -> String {
        let key = |k: &str| format!("{section}.{k}");
        match self {
            Refusal::UnknownIssuer {
                fingerprint,
                self_signed,
            } => {
                let what = if *self_signed {
                    "is self-signed and"
                } else {
                    "is"
                };
                let pin = format!(
                    "{} = \"{}\"",
                    key("tls_fingerprint"),
                    format_fingerprint(fingerprint)
                );
                match ca_file {
                    Some(path) => format!(
                        "the certificate of {who} {what} not signed by a CA in {} {}: if the server's \
                         certificate is self-signed, put that certificate itself in {}, or pin it with {pin}",
                        key("ca_file"),
                        path.display(),
                        key("ca_file"),
                    ),
                    None => format!(
                        "the certificate of {who} {what} not signed by a CA this system trusts: for a \
                         private CA set {} to the CA's certificate; for a self-signed certificate put \
                         that certificate itself in {}, or pin it with {pin}",
                        key("ca_file"),
                        key("ca_file"),
                    ),
                }
            }
            Refusal::NameMismatch { names } => {
                let host = who.rsplit_once(':').map_or(who, |(h, _)| h);
                let names = if names.is_empty() {
                    "no host name at all".to_string()
                } else {
                    names.join(", ")
                };
                let host_key = if section == "email" {
                    "email.smtp_host".to_string()
                } else {
                    key("host")
                };
                format!(
                    "the certificate of {who} names {names}, not {host}: set {host_key} to a name it gives"
                )
            }
            Refusal::Expired {
                not_after,
                fingerprint,
            } => format!(
                "the certificate of {who} expired on {} (its fingerprint is {}): the server needs a new \
                 certificate",
                date(*not_after),
                format_fingerprint(fingerprint)
            ),
            Refusal::NotYetValid { not_before } => format!(
                "the certificate of {who} is not valid before {}: check this computer's clock, or the \
                 server's certificate",
                date(*not_before)
            ),
            Refusal::PinMismatch {
                expected,
                presented,
            } => format!(
                "the certificate of {who} has the fingerprint {}, not {} as {} says: if the server's \
                 certificate was replaced on purpose, put its new fingerprint in {}",
                format_fingerprint(presented),
                format_fingerprint(expected),
                key("tls_fingerprint"),
                key("tls_fingerprint"),
            ),
            Refusal::Revoked => format!("the certificate of {who} was revoked by its CA"),
            Refusal::WrongPurpose => {
                format!(
                    "the certificate of {who} is not meant for a TLS server (extended key usage)"
                )
            }
            Refusal::Other(why) => format!("the certificate of {who} is refused: {why}"),
        }
    }

    fn into_error(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// What a certificate says of itself, as far as the messages and the self-listed check need.
struct CertInfo {
    /// subjectAltName dNSNames and iPAddresses, as text; `None` when it has no subjectAltName.
    san: Option<Vec<String>>,
    /// The subject's common names.
    cns: Vec<String>,
    not_before: i64,
    not_after: i64,
    self_signed: bool,
}

impl CertInfo {
    fn parse(der: &[u8]) -> Option<CertInfo> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = match cert.subject_alternative_name() {
            Ok(Some(ext)) => Some(
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        GeneralName::IPAddress(b) => ip_text(b),
                        _ => None,
                    })
                    .collect(),
            ),
            Ok(None) => None,
            // A broken extension gives no name.
            Err(_) => Some(Vec::new()),
        };
        let cns = cert
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect();
        Some(CertInfo {
            san,
            cns,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            self_signed: cert.subject() == cert.issuer(),
        })
    }

    /// The names it gives: its subjectAltNames, or without any, its CNs.
    fn names(&self) -> Vec<String> {
        self.san.clone().unwrap_or_else(|| self.cns.clone())
    }

    /// Whether it is for `server`: a subjectAltName dNSName (one leading `*.` label allowed) or iPAddress;
    /// without a subjectAltName extension, the subject CN.
    fn is_for(&self, server: &ServerName<'_>) -> bool {
        let wanted = match server {
            ServerName::DnsName(d) => d.as_ref().trim_end_matches('.').to_ascii_lowercase(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            _ => return false,
        };
        let is_ip = matches!(server, ServerName::IpAddress(_));
        self.names().iter().any(|n| {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            if is_ip {
                // CN text such as "127.0.0.1", or an iPAddress (already text).
                n.parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.to_string() == wanted)
            } else if let Some(rest) = n.strip_prefix("*.") {
                wanted
                    .split_once('.')
                    .is_some_and(|(first, tail)| !first.is_empty() && tail == rest)
            } else {
                n == wanted
            }
        })
    }
}

fn ip_text(b: &[u8]) -> Option<String> {
    match b.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?).to_string()),
        _ => None,
    }
}

/// The server certificate verifier for `Trust`.
#[derive(Debug)]
struct Verifier {
    /// The pinned fingerprint.
    pin: Option<[u8; 32]>,
    /// The certificates of ca_file, trusted as themselves too.
    listed: Vec<CertificateDer<'static>>,
    /// Whether `chain` has the ca_file CAs (else the system's).
    private: bool,
    /// Chain validation: the ca_file CAs, or the platform's.
    chain: Arc<dyn ServerCertVerifier>,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    /// Checks a self-listed certificate's names and dates.
    fn check_listed(
        &self,
        der: &[u8],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), Refusal> {
        let info = CertInfo::parse(der)
            .ok_or_else(|| Refusal::Other("it cannot be read (not X.509 DER)".into()))?;
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if now > info.not_after {
            return Err(Refusal::Expired {
                not_after: info.not_after,
                fingerprint: fingerprint_of(der),
            });
        }
        if now < info.not_before {
            return Err(Refusal::NotYetValid {
                not_before: info.not_before,
            });
        }
        if !info.is_for(server_name) {
            return Err(Refusal::NameMismatch {
                names: info.names(),
            });
        }
        Ok(())
    }

    /// A chain validation error, as a refusal with what a person needs.
    fn refusal(error: rustls::Error, der: &[u8]) -> rustls::Error {
        let rustls::Error::InvalidCertificate(cert_error) = &error else {
            return error;
        };
        let info = CertInfo::parse(der);
        let fingerprint = fingerprint_of(der);
        let refusal =
            match cert_error {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Refusal::UnknownIssuer {
                        fingerprint,
                        self_signed: info.as_ref().is_some_and(|i| i.self_signed),
                    }
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Refusal::NameMismatch {
                    names: info.map(|i| i.names()).unwrap_or_default(),
                },
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired {
                        not_after: info.as_ref().map_or(0, |i| i.not_after),
                        fingerprint,
                    }
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Refusal::NotYetValid {
                        not_before: info.as_ref().map_or(0, |i| i.not_before),
                    }
                }
                CertificateError::Revoked => Refusal::Revoked,
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => Refusal::WrongPurpose,
                CertificateError::Other(OtherError(inner))
                    if inner.to_string().contains("CaUsedAsEndEntity") =>
                {
                    Refusal::UnknownIssuer {
                        fingerprint,
                        self_signed: info.as_ref().is_some_and(|i| i.self_signed),
                    }
                }
                CertificateError::Other(OtherError(inner)) => Refusal::Other(format!(
                    "{inner} (its fingerprint is {})",
                    format_fingerprint(&fingerprint)
                )),
                CertificateError::BadEncoding => {
                    Refusal::Other("it cannot be read (bad encoding)".into())
                }
                _ => Refusal::Other(format!(
                    "it is not acceptable (its fingerprint is {})",
                    format_fingerprint(&fingerprint)
                )),
            };
        refusal.into_error()
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let der = end_entity.as_ref();
        if let Some(pin) = self.pin {
            let presented = fingerprint_of(der);
            return if presented == pin {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(Refusal::PinMismatch {
                    expected: pin,
                    presented,
                }
                .into_error())
            };
        }
        if self.listed.iter().any(|c| c.as_ref() == der) {
            return self
                .check_listed(der, server_name, now)
                .map(|()| ServerCertVerified::assertion())
                .map_err(Refusal::into_error);
        }
        match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            // The chain is good (webpki checks the names after it), but the name is not in a
            // subjectAltName: a private CA's certificate without any subjectAltName may name the host in
            // its CN, as older tools accept.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.private
                && CertInfo::parse(der)
                    .is_some_and(|i| i.san.is_none() && i.is_for(server_name)) =>
            {
                self.check_listed(der, server_name, now)
                    .map(|()| ServerCertVerified::assertion())
                    .map_err(Refusal::into_error)
            }
            Err(e) => Err(Verifier::refusal(e, der)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls settings for `trust`.
pub fn client_config(trust: &Trust<'_>) -> Result<Arc<rustls::ClientConfig>, String> {
    let verifier = verifier(trust)?;
    let config = rustls::ClientConfig::builder_with_provider(verifier.provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The verifier for `trust`.
fn verifier(trust: &Trust<'_>) -> Result<Verifier, String> {
    let section = trust.section;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pin = trust
        .fingerprint
        .map(|f| parse_fingerprint(f).map_err(|e| format!("{section}.tls_fingerprint: {e}")))
        .transpose()?;
    let (listed, private, chain): (_, _, Arc<dyn ServerCertVerifier>) = match trust.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read {section}.ca_file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "{section}.ca_file {} holds no certificate (expected PEM, \
                     \"-----BEGIN CERTIFICATE-----\")",
                    path.display()
                ));
            }
            let mut roots = rustls::RootCertStore::empty();
            // Only CAs in date sign for others (webpki checks neither of an anchor): an expired or
            // end-entity certificate in the file is trusted as itself alone, by the listed path.
            let (_added, _) =
                roots.add_parsable_certificates(certs.iter().filter(|c| may_sign(c)).cloned());
            // A file of certificates webpki cannot take as CAs still works for the certificates in it.
            let chain: Arc<dyn ServerCertVerifier> = if roots.is_empty() {
                Arc::new(NoChain)
            } else {
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("{section}.ca_file {}: {e}", path.display()))?
            };
            (certs, true, chain)
        }
        None => (
            Vec::new(),
            false,
            Arc::new(
                rustls_platform_verifier::Verifier::new(provider.clone())
                    .map_err(|e| format!("TLS setup: the system's CAs: {e}"))?,
            ) as Arc<dyn ServerCertVerifier>,
        ),
    };
    Ok(Verifier {
        pin,
        listed,
        private,
        chain,
        provider,
    })
}

/// Whether `cert` may anchor a chain: it does not say CA:FALSE, and it is within its dates.
fn may_sign(cert: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    // An old v1 CA has no basicConstraints at all: taken as a CA, as webpki would.
    let ca = match parsed.basic_constraints() {
        Ok(Some(b)) => b.value.ca,
        Ok(None) => true,
        Err(_) => false,
    };
    ca && parsed.validity().is_valid()
}

/// A chain verifier with no CA: refuses every certificate as of an unknown issuer.
#[derive(Debug)]
struct NoChain;

impl ServerCertVerifier for NoChain {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("unused".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("unused".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Vec::new()
    }
}

/// "HandshakeFailure" as "handshake failure".
fn words(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The hint for a port that does not speak TLS at once.
fn plain_first(section: &str) -> String {
    if section == "email" {
        "port 587 or 25 speaks plain SMTP first: set email.tls = \"starttls\" (port 465 speaks TLS at once)"
            .to_string()
    } else {
        format!(
            "port 143 speaks plain IMAP first: set {section}.tls = \"starttls\" (port 993 speaks TLS at once)"
        )
    }
}

/// A failed TLS handshake with `host:port`, as a sentence: what failed and the fix.
pub fn explain_handshake(
    error: &std::io::Error,
    host: &str,
    port: u16,
    trust: &Trust<'_>,
) -> String {
    let who = format!("{host}:{port}");
    let section = trust.section;
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let why = match rustls_error {
        Some(e) => explain_rustls(e, &who, trust),
        None => match error.kind() {
            std::io::ErrorKind::UnexpectedEof => format!(
                "{who} closed the connection during the TLS handshake: if it speaks plain text first, \
                 {}; otherwise the server's log says why",
                plain_first(section)
            ),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => format!(
                "{who} dropped the connection during the TLS handshake; the server's log says why"
            ),
            _ => format!("the TLS handshake with {who} failed: {error}"),
        },
    };
    format!("TLS with {host} failed: {why}")
}

fn explain_rustls(e: &rustls::Error, who: &str, trust: &Trust<'_>) -> String {
    use rustls::Error as E;
    let section = trust.section;
    match e {
        E::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            match inner.downcast_ref::<Refusal>() {
                Some(r) => r.sentence(who, section, trust.ca_file),
                None => format!("the certificate of {who} is refused: {inner}"),
            }
        }
        E::InvalidCertificate(other) => format!(
            "the certificate of {who} is refused ({})",
            words(&format!("{other:?}").replace(['{', '}', '(', ')', ',', ':'], ""))
        ),
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => {
            format!("{who} did not answer TLS; {}", plain_first(section))
        }
        E::AlertReceived(alert) => format!(
            "{who} refused the TLS handshake (its alert: {}); the server's log says why",
            words(&format!("{alert:?}"))
        ),
        E::PeerIncompatible(_) => format!(
            "{who} and mastsub have no TLS version or cipher suite in common (mastsub speaks TLS 1.2 \
             and 1.3)"
        ),
        E::NoCertificatesPresented => format!("{who} presented no certificate"),
        E::General(text) => format!("the TLS handshake with {who} failed: {text}"),
        E::PeerMisbehaved(_) => {
            format!("{who} broke the TLS protocol during the handshake")
        }
        _ => format!("the TLS handshake with {who} failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    fn io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    fn trust<'a>(section: &'static str, ca: Option<&'a Path>) -> Trust<'a> {
        Trust {
            section,
            ca_file: ca,
            fingerprint: None,
        }
    }

    fn no_debug(text: &str) {
        for bad in ["{", "}", "Other(", "OtherError", "Error(", "[", "\\\""] {
            assert!(!text.contains(bad), "Debug text {bad:?} in: {text}");
        }
    }

    #[test]
    fn fingerprints_are_read_as_openssl_prints_them_and_as_people_write_them() {
        let want = parse_fingerprint(&FP.replace(':', "")).unwrap();
        for text in [
            FP.to_string(),
            format!("sha256:{FP}"),
            format!("SHA256:{}", FP.to_lowercase()),
            format!("sha256:{}", FP.replace(':', "").to_lowercase()),
            format!("SHA256 Fingerprint={FP}"),
        ] {
            assert_eq!(parse_fingerprint(&text).unwrap(), want, "{text}");
        }
        assert_eq!(want[0], 0xab);
        for bad in [
            "",
            "sha256:",
            "sha256:abcd",
            &FP[3..],
            "md5:00",
            &FP.replace("AB", "ZZ"),
        ] {
            let e = parse_fingerprint(bad).unwrap_err();
            assert!(e.contains("sha256:"), "{bad}: {e}");
        }
        assert!(
            parse_fingerprint(&format!("sha1:{FP}"))
                .unwrap_err()
                .contains("\"sha1\"")
        );
        assert_eq!(
            format_fingerprint(&want),
            format!("sha256:{}", FP.replace(':', "").to_lowercase())
        );
    }

    #[test]
    fn every_certificate_refusal_is_a_sentence_with_the_fix() {
        let fp = [0xab; 32];
        let hex = "sha256:".to_string() + &"ab".repeat(32);
        let ca = Path::new("/x/ca.pem");
        let explain = |r: Refusal, t: &Trust<'_>| {
            let text = explain_handshake(&io(r.into_error()), "127.0.0.1", 993, t);
            no_debug(&text);
            text
        };

        let t = explain(
            Refusal::UnknownIssuer {
                fingerprint: fp,
                self_signed: true,
            },
            &trust("imap", Some(ca)),
        );
        assert_eq!(
            t,
            format!(
                "TLS with 127.0.0.1 failed: the certificate of 127.0.0.1:993 is self-signed and not signed \
                 by a CA in imap.ca_file /x/ca.pem: if the server's certificate is self-signed, put that \
                 certificate itself in imap.ca_file, or pin it with imap.tls_fingerprint = \"{hex}\""
            )
        );
        let t = explain(
            Refusal::UnknownIssuer {
                fingerprint: fp,
                self_signed: false,
            },
            &trust("imap", None),
        );
        assert!(
            t.contains("is not signed by a CA this system trusts"),
            "{t}"
        );
        assert!(t.contains("for a private CA set imap.ca_file"), "{t}");
        assert!(
            t.contains(&format!("imap.tls_fingerprint = \"{hex}\"")),
            "{t}"
        );

        let t = explain(
            Refusal::NameMismatch {
                names: vec!["mail.example.org".into(), "smtp.example.org".into()],
            },
            &trust("imap", Some(ca)),
        );
        assert_eq!(
            t,
            "TLS with 127.0.0.1 failed: the certificate of 127.0.0.1:993 names mail.example.org, \
             smtp.example.org, not 127.0.0.1: set imap.host to a name it gives"
        );
        let t = explain(
            Refusal::NameMismatch { names: vec![] },
            &trust("email", Some(ca)),
        );
        assert!(
            t.contains("names no host name at all, not 127.0.0.1: set email.smtp_host"),
            "{t}"
        );

        let t = explain(
            Refusal::Expired {
                not_after: 1_600_000_000,
                fingerprint: fp,
            },
            &trust("imap", Some(ca)),
        );
        assert!(t.contains("expired on 2020-09-13 12:26:40 UTC"), "{t}");
        assert!(t.contains("needs a new certificate"), "{t}");
        let t = explain(
            Refusal::NotYetValid {
                not_before: 4_000_000_000,
            },
            &trust("imap", Some(ca)),
        );
        assert!(
            t.contains("is not valid before 2096-10-02 07:06:40 UTC: check this computer's clock"),
            "{t}"
        );

        let t = explain(
            Refusal::PinMismatch {
                expected: [0x11; 32],
                presented: fp,
            },
            &trust("email", None),
        );
        assert_eq!(
            t,
            format!(
                "TLS with 127.0.0.1 failed: the certificate of 127.0.0.1:993 has the fingerprint {hex}, \
                 not sha256:{} as email.tls_fingerprint says: if the server's certificate was replaced \
                 on purpose, put its new fingerprint in email.tls_fingerprint",
                "11".repeat(32)
            )
        );
        for r in [
            Refusal::Revoked,
            Refusal::WrongPurpose,
            Refusal::Other("x".into()),
        ] {
            let t = explain(r, &trust("imap", None));
            assert!(
                t.starts_with("TLS with 127.0.0.1 failed: the certificate of 127.0.0.1:993 "),
                "{t}"
            );
        }
    }

    #[test]
    fn protocol_failures_are_sentences_too() {
        use rustls::{AlertDescription, Error as E, InvalidMessage, PeerIncompatible};
        let imap = trust("imap", None);
        let t = explain_handshake(
            &io(E::InvalidMessage(InvalidMessage::InvalidContentType)),
            "mail.example.org",
            143,
            &imap,
        );
        assert_eq!(
            t,
            "TLS with mail.example.org failed: mail.example.org:143 did not answer TLS; port 143 speaks \
             plain IMAP first: set imap.tls = \"starttls\" (port 993 speaks TLS at once)"
        );
        let t = explain_handshake(
            &io(E::InvalidMessage(InvalidMessage::InvalidContentType)),
            "smtp.example.org",
            587,
            &trust("email", None),
        );
        assert!(t.contains("smtp.example.org:587 did not answer TLS; port 587 or 25 speaks plain SMTP first: set email.tls = \"starttls\""), "{t}");
        let t = explain_handshake(
            &io(E::AlertReceived(AlertDescription::HandshakeFailure)),
            "h",
            993,
            &imap,
        );
        assert_eq!(
            t,
            "TLS with h failed: h:993 refused the TLS handshake (its alert: handshake failure); the \
             server's log says why"
        );
        let t = explain_handshake(
            &io(E::PeerIncompatible(
                PeerIncompatible::NoCipherSuitesInCommon,
            )),
            "h",
            993,
            &imap,
        );
        assert!(
            t.contains("no TLS version or cipher suite in common"),
            "{t}"
        );
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        let t = explain_handshake(&eof, "h", 993, &imap);
        assert!(
            t.starts_with(
                "TLS with h failed: h:993 closed the connection during the TLS handshake"
            ),
            "{t}"
        );
        let t = explain_handshake(
            &io(E::InvalidCertificate(CertificateError::UnknownIssuer)),
            "h",
            993,
            &imap,
        );
        assert_eq!(
            t,
            "TLS with h failed: the certificate of h:993 is refused (unknown issuer)"
        );
        for t in [t, explain_handshake(&eof, "h", 1, &imap)] {
            no_debug(&t);
        }
    }

    /// A certificate and its key, made with rcgen.
    fn cert(names: &[&str], ca: bool, past: bool) -> (CertificateDer<'static>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        if past {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let c = p.self_signed(&key).unwrap();
        (c.der().clone(), c.pem())
    }

    fn made(dir: &Path, listed: &[&str], pin: Option<&str>) -> Verifier {
        let path = dir.join("ca.pem");
        std::fs::write(&path, listed.concat()).unwrap();
        verifier(&Trust {
            section: "imap",
            ca_file: (!listed.is_empty()).then_some(path.as_path()),
            fingerprint: pin,
        })
        .unwrap()
    }

    fn check(v: &Verifier, cert: &CertificateDer<'_>, host: &str) -> Result<(), Refusal> {
        let name = ServerName::try_from(host.to_string()).unwrap();
        match v.verify_server_cert(cert, &[], &name, &[], UnixTime::now()) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e)))) => {
                Err(e.downcast_ref::<Refusal>().expect("a Refusal").clone())
            }
            Err(e) => panic!("not a Refusal: {e}"),
        }
    }

    #[test]
    fn listed_certificates_are_trusted_as_themselves_with_names_and_dates_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (self_ca, self_ca_pem) = cert(&["localhost", "127.0.0.1"], true, false);
        let (other, _) = cert(&["localhost"], false, false);
        let (old, old_pem) = cert(&["localhost"], false, true);
        let (wild, wild_pem) = cert(&["*.example.org"], true, false);
        let c = made(dir.path(), &[&self_ca_pem, &old_pem, &wild_pem], None);
        check(&c, &self_ca, "localhost").unwrap();
        check(&c, &self_ca, "LOCALHOST").unwrap();
        check(&c, &self_ca, "127.0.0.1").unwrap();
        check(&c, &wild, "mail.example.org").unwrap();
        assert!(matches!(
            check(&c, &wild, "a.b.example.org"),
            Err(Refusal::NameMismatch { .. })
        ));
        assert_eq!(
            check(&c, &self_ca, "mail.example.org"),
            Err(Refusal::NameMismatch {
                names: vec!["localhost".into(), "127.0.0.1".into()]
            })
        );
        assert!(matches!(
            check(&c, &old, "localhost"),
            Err(Refusal::Expired {
                not_after: 978_307_200,
                ..
            })
        ));
        // Not listed, not signed by a listed CA.
        assert!(matches!(
            check(&c, &other, "localhost"),
            Err(Refusal::UnknownIssuer { self_signed: true, fingerprint }) if fingerprint == fingerprint_of(other.as_ref())
        ));

        // Pinned: only that certificate, whatever the name.
        let pin = format_fingerprint(&fingerprint_of(other.as_ref()));
        let p = made(dir.path(), &[&self_ca_pem], Some(&pin));
        check(&p, &other, "mail.example.org").unwrap();
        assert_eq!(
            check(&p, &self_ca, "localhost"),
            Err(Refusal::PinMismatch {
                expected: fingerprint_of(other.as_ref()),
                presented: fingerprint_of(self_ca.as_ref()),
            })
        );
    }

    #[test]
    fn a_certificate_without_subject_alt_name_gives_its_cn() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "LocalHost");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let generated = p.self_signed(&key).unwrap();
        let der = generated.der().clone();
        let dir = tempfile::tempdir().unwrap();
        let c = made(dir.path(), &[&generated.pem()], None);
        check(&c, &der, "localhost").unwrap();
        assert_eq!(
            check(&c, &der, "127.0.0.1"),
            Err(Refusal::NameMismatch {
                names: vec!["LocalHost".into()]
            })
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused_at_setup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = client_config(&trust("imap", Some(&path))).unwrap_err();
        assert!(
            e.contains("imap.ca_file") && e.contains("holds no certificate"),
            "{e}"
        );
        let e = client_config(&Trust {
            section: "email",
            ca_file: None,
            fingerprint: Some("sha256:12"),
        })
        .unwrap_err();
        assert!(e.starts_with("email.tls_fingerprint: expected"), "{e}");
    }
}
