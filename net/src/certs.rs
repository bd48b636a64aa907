//! A cluster's certificates: its own CA, and per node a certificate that CA signs. Files are
//! PEM in one directory — `ca.pem` (the CA certificate, shared), `ca.key` (kept by whoever
//! adds nodes), and per node `<name>.pem` + `<name>.key`. Every node certificate names
//! `sundial.cluster` (what peers check) and the node's own name.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};

/// The name every node certificate carries and every client checks: membership in the
/// cluster is proven by the CA's signature, not by a host name.
pub const CLUSTER_SERVER_NAME: &str = "sundial.cluster";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {rule}")]
    Invalid { path: PathBuf, rule: String },
    #[error("generating: {0}")]
    Generate(String),
    #[error("{0}")]
    Name(String),
    #[error("{path} already exists; remove it or choose another directory")]
    Exists { path: PathBuf },
}

/// A CA: its cluster's name, its certificate and key (PEM). `ca.pem` starts with a
/// `# sundial cluster: <name>` line, which rebuilds the CA's subject when issuing.
pub struct CertificateAuthority {
    pub cluster: String,
    pub certificate_pem: String,
    pub key_pem: String,
}

const CLUSTER_LINE: &str = "# sundial cluster: ";

/// What a node needs to join its cluster's transport: the CA certificate, and its own
/// certificate and key (all DER).
pub struct NodeIdentity {
    ca: CertificateDer<'static>,
    certificate: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl NodeIdentity {
    pub fn ca_certificate(&self) -> CertificateDer<'static> {
        self.ca.clone()
    }

    pub fn certificate(&self) -> CertificateDer<'static> {
        self.certificate.clone()
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Reads `ca.pem`, `<name>.pem` and `<name>.key` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<NodeIdentity, CertError> {
        let ca = read_certificate(&dir.join("ca.pem"))?;
        let certificate = read_certificate(&dir.join(format!("{name}.pem")))?;
        let key_path = dir.join(format!("{name}.key"));
        let key_pem = read(&key_path)?;
        let key = pem_block(&key_path, &key_pem, "PRIVATE KEY")?;
        Ok(NodeIdentity { ca, certificate, key: PrivatePkcs8KeyDer::from(key) })
    }

    /// From PEM text already in memory.
    pub fn from_pem(ca_pem: &str, certificate_pem: &str, key_pem: &str) -> Result<NodeIdentity, CertError> {
        let here = PathBuf::from("(memory)");
        Ok(NodeIdentity {
            ca: CertificateDer::from(pem_block(&here, ca_pem, "CERTIFICATE")?),
            certificate: CertificateDer::from(pem_block(&here, certificate_pem, "CERTIFICATE")?),
            key: PrivatePkcs8KeyDer::from(pem_block(&here, key_pem, "PRIVATE KEY")?),
        })
    }
}

impl CertificateAuthority {
    /// The CA's parameters: rebuilt the same way each time, so a certificate issued later
    /// names exactly the subject the CA certificate carries.
    fn params(cluster: &str) -> Result<CertificateParams, CertError> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| CertError::Generate(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, format!("sundial cluster {cluster} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        Ok(params)
    }

    /// A new CA for the cluster named `cluster` (letters, digits and '-').
    pub fn generate(cluster: &str) -> Result<CertificateAuthority, CertError> {
        check_name("cluster", cluster)?;
        let generate = |e: rcgen::Error| CertError::Generate(e.to_string());
        let key = KeyPair::generate().map_err(generate)?;
        let certificate = CertificateAuthority::params(cluster)?.self_signed(&key).map_err(generate)?;
        Ok(CertificateAuthority {
            cluster: cluster.to_string(),
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for the node `name`, signed by this CA: (certificate PEM, key PEM).
    pub fn issue(&self, name: &str) -> Result<(String, String), CertError> {
        check_name("node name", name)?;
        let generate = |e: rcgen::Error| CertError::Generate(e.to_string());
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(generate)?;
        let issuer = Issuer::new(CertificateAuthority::params(&self.cluster)?, ca_key);
        let names = vec![CLUSTER_SERVER_NAME.to_string(), name.to_string()];
        let mut params = CertificateParams::new(names).map_err(generate)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(generate)?;
        let certificate = params.signed_by(&key, &issuer).map_err(generate)?;
        Ok((certificate.pem(), key.serialize_pem()))
    }

    /// Writes `ca.pem` and `ca.key` into `dir` (created); refuses to overwrite.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        write_new(dir, "ca.pem", &format!("{CLUSTER_LINE}{}\n{}", self.cluster, self.certificate_pem))?;
        write_new(dir, "ca.key", &self.key_pem)
    }

    pub fn load(dir: &Path) -> Result<CertificateAuthority, CertError> {
        let path = dir.join("ca.pem");
        let certificate_pem = read(&path)?;
        let cluster = certificate_pem
            .lines()
            .find_map(|line| line.strip_prefix(CLUSTER_LINE))
            .ok_or_else(|| CertError::Invalid { path: path.clone(), rule: format!("no {CLUSTER_LINE:?} line") })?
            .trim()
            .to_string();
        Ok(CertificateAuthority { cluster, certificate_pem, key_pem: read(&dir.join("ca.key"))? })
    }

    /// Issues the node `name`'s certificate and writes `<name>.pem` and `<name>.key`.
    pub fn write_node(&self, dir: &Path, name: &str) -> Result<(), CertError> {
        let (certificate, key) = self.issue(name)?;
        write_new(dir, &format!("{name}.pem"), &certificate)?;
        write_new(dir, &format!("{name}.key"), &key)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), CertError> {
    if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(CertError::Name(format!("{what} {name:?}: 1 to 63 letters, digits and '-'")));
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

fn read_certificate(path: &Path) -> Result<CertificateDer<'static>, CertError> {
    Ok(CertificateDer::from(pem_block(path, &read(path)?, "CERTIFICATE")?))
}

/// The bytes of the first PEM block labelled `label`.
fn pem_block(path: &Path, text: &str, label: &str) -> Result<Vec<u8>, CertError> {
    let invalid = |rule: String| CertError::Invalid { path: path.to_path_buf(), rule };
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(|| invalid(format!("no {label} block")))? + begin.len();
    let stop = text[start..].find(&end).ok_or_else(|| invalid(format!("the {label} block is not closed")))? + start;
    let base64: String = text[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(base64)
        .map_err(|e| invalid(format!("the {label} block is not base64: {e}")))
}

/// Writes a new file readable by its owner only (keys are secrets); refuses to overwrite.
fn write_new(dir: &Path, name: &str, text: &str) -> Result<(), CertError> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => CertError::Exists { path: path.clone() },
        _ => CertError::Io { path: path.clone(), source },
    })?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(|source| CertError::Io { path, source })
}
