//! TLS termination: the certificate store of a listener, SNI selection, and hot
//! reload. Portico uses Pingora's OpenSSL backend (see docs/tls.md for why): each TLS
//! listener's acceptor asks `Sni::certificate_callback` for a certificate during the
//! handshake, which looks the server name up in an immutable `CertStore` (exact names,
//! then wildcards, then the default) held in an `ArcSwap`. A watcher reloads the store
//! when certificate files change; a bad certificate or key is refused and the old store
//! stays, so new handshakes see new certificates without a restart and open
//! connections are untouched.

use crate::config::model::ListenerTls;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::ext;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::{NameType, SslVerifyMode, SslVersion};
use pingora::tls::x509::X509;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One certificate chain with its key and the names it serves.
pub struct CertEntry {
    pub names: Vec<String>,
    pub leaf: X509,
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
    pub source: String,
}

/// The certificates of a listener, indexed by name.
pub struct CertStore {
    entries: Vec<Arc<CertEntry>>,
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, usize>,
}

impl CertStore {
    /// The entry for a server name (the first certificate when nothing matches).
    pub fn pick(&self, sni: Option<&str>) -> Option<&Arc<CertEntry>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(&i) = self.exact.get(&name) {
                return self.entries.get(i);
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(&i) = self.wildcard.get(parent) {
                    return self.entries.get(i);
                }
            }
        }
        self.entries.first()
    }

    /// (source file, names) of each certificate, for logs and the admin API.
    pub fn describe(&self) -> Vec<(String, Vec<String>)> {
        self.entries
            .iter()
            .map(|e| (e.source.clone(), e.names.clone()))
            .collect()
    }
}

/// The DNS names a certificate serves: its SANs, or its CN when it has none.
fn names_of(cert: &X509) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject_alt_names()
        .map(|sans| {
            sans.iter()
                .filter_map(|n| n.dnsname().map(|d| d.to_ascii_lowercase()))
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        if let Some(cn) = cert
            .subject_name()
            .entries_by_nid(pingora::tls::nid::Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok())
        {
            names.push(cn.to_string().to_ascii_lowercase());
        }
    }
    names
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertEntry, String> {
    let pem = std::fs::read(cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key_pem = std::fs::read(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    parse_pair(
        &pem,
        &key_pem,
        &cert_path.display().to_string(),
        &key_path.display().to_string(),
    )
}

/// A certificate chain and key held in memory (a Kubernetes TLS Secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PemCert {
    /// Where it came from, for logs (`secret ns/name`).
    pub source: String,
    /// Names it serves; empty means the names in the certificate.
    pub names: Vec<String>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Parses an in-memory certificate chain and key (the key must match the leaf).
pub fn load_pem(p: &PemCert) -> Result<CertEntry, String> {
    let mut e = parse_pair(
        &p.cert_pem,
        &p.key_pem,
        &format!("{} (certificate)", p.source),
        &format!("{} (key)", p.source),
    )?;
    e.source = p.source.clone();
    if !p.names.is_empty() {
        e.names = p.names.iter().map(|n| n.to_ascii_lowercase()).collect();
    }
    Ok(e)
}

fn parse_pair(
    pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<CertEntry, String> {
    let mut certs = X509::stack_from_pem(pem)
        .map_err(|e| format!("{cert_name}: not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{cert_name}: no certificate found"));
    }
    let leaf = certs.remove(0);
    let key = PKey::private_key_from_pem(key_pem)
        .map_err(|e| format!("{key_name}: not a PEM private key: {e}"))?;
    let matches = leaf
        .public_key()
        .map(|pk| pk.public_eq(&key))
        .unwrap_or(false);
    if !matches {
        return Err(format!("{key_name} does not belong to {cert_name}"));
    }
    let names = names_of(&leaf);
    Ok(CertEntry {
        names,
        leaf,
        chain: certs,
        key,
        source: cert_name.to_string(),
    })
}

/// The certificate/key file pairs of a TLS config (list first, then the folder).
pub fn cert_files(tls: &ListenerTls) -> Vec<(PathBuf, PathBuf)> {
    let mut out: Vec<(PathBuf, PathBuf)> = tls
        .certificates
        .iter()
        .map(|c| (PathBuf::from(&c.cert), PathBuf::from(&c.key)))
        .collect();
    if let Some(dir) = &tls.dir {
        let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        matches!(
                            p.extension().and_then(|x| x.to_str()),
                            Some("crt") | Some("pem")
                        )
                    })
                    .filter_map(|p| {
                        let key = p.with_extension("key");
                        key.is_file().then_some((p, key))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        out.extend(found);
    }
    out
}

/// Loads every certificate of a listener; any bad one fails the whole store.
pub fn load_store(tls: &ListenerTls) -> Result<CertStore, String> {
    let entries = load_files(tls)?;
    if entries.is_empty() {
        return Err(
            "no certificates (give `certificates` or a `dir` with NAME.crt + NAME.key)".into(),
        );
    }
    Ok(build_store(entries))
}

/// Loads the certificate files of a listener; any bad one fails them all.
fn load_files(tls: &ListenerTls) -> Result<Vec<Arc<CertEntry>>, String> {
    cert_files(tls)
        .iter()
        .map(|(c, k)| load_pair(c, k).map(Arc::new))
        .collect()
}

/// Indexes entries by name; the first entry serving a name wins it.
fn build_store(entries: Vec<Arc<CertEntry>>) -> CertStore {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        for n in &e.names {
            match n.strip_prefix("*.") {
                Some(parent) => {
                    wildcard.entry(parent.to_string()).or_insert(i);
                }
                None => {
                    exact.entry(n.clone()).or_insert(i);
                }
            }
        }
    }
    CertStore {
        entries,
        exact,
        wildcard,
    }
}

/// What the handshake learned about the client certificate.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The subject as `CN=...,O=...` (RFC 4514 order reversed, as most tools print).
    pub subject: String,
}

/// The per-listener SNI resolver. Its store is the listener's certificate files
/// followed by the in-memory certificates (TLS Secrets in ingress mode); each part is
/// replaced on its own (file reload, `set_memory`) and the store rebuilt from both.
pub struct Sni {
    pub store: ArcSwap<CertStore>,
    pub listener: String,
    files: ArcSwap<Vec<Arc<CertEntry>>>,
    memory: ArcSwap<Vec<Arc<CertEntry>>>,
    /// Serializes rebuilds so a file reload and a memory update cannot lose each other.
    rebuild: std::sync::Mutex<()>,
}

impl Sni {
    fn rebuild_store(&self) {
        let _g = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Arc<CertEntry>> = self.files.load().iter().cloned().collect();
        all.extend(self.memory.load().iter().cloned());
        self.store.store(Arc::new(build_store(all)));
    }

    /// Replaces the in-memory certificates. Bad ones are left out and reported, one
    /// message each; the good ones (and the files) are served.
    pub fn set_memory(&self, certs: &[PemCert]) -> Vec<String> {
        let mut errors = vec![];
        let mut entries = vec![];
        for c in certs {
            match load_pem(c) {
                Ok(e) => entries.push(Arc::new(e)),
                Err(e) => errors.push(e),
            }
        }
        self.memory.store(Arc::new(entries));
        self.rebuild_store();
        errors
    }
}

struct Callbacks(Arc<Sni>);

#[async_trait]
impl TlsAccept for Callbacks {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let store = self.0.store.load();
        let name = ssl.servername(NameType::HOST_NAME).map(str::to_string);
        let Some(entry) = store.pick(name.as_deref()) else {
            return;
        };
        if let Err(e) = ext::ssl_use_certificate(ssl, &entry.leaf) {
            log::warn!("listener {}: cannot use certificate: {e}", self.0.listener);
            return;
        }
        if let Err(e) = ext::ssl_use_private_key(ssl, &entry.key) {
            log::warn!("listener {}: cannot use key: {e}", self.0.listener);
            return;
        }
        for c in &entry.chain {
            let _ = ext::ssl_add_chain_cert(ssl, c);
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let cert = ssl.peer_certificate()?;
        let subject = cert
            .subject_name()
            .entries()
            .filter_map(|e| {
                let key = e.object().nid().short_name().ok()?;
                let val = e.data().to_string().ok()?;
                Some(format!("{key}={}", escape_dn_value(&val)))
            })
            .collect::<Vec<_>>()
            .join(",");
        Some(Arc::new(ClientCert { subject }))
    }
}

/// RFC 4514 escaping of an attribute value, so a CN like `a,O=Admins` cannot pose as
/// another attribute.
fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c.is_control() {
            out.push_str(&format!("\\{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

const CIPHERS_TLS12: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

/// Builds the TLS settings of a listener; also returns its resolver for reloads.
/// `allow_no_files`: the listener may start without any certificate file (ingress
/// mode: the certificates come from TLS Secrets through `Sni::set_memory`).
pub fn settings_with(
    name: &str,
    tls: &ListenerTls,
    http2: bool,
    allow_no_files: bool,
) -> Result<(TlsSettings, Arc<Sni>), String> {
    let files = load_files(tls)?;
    if files.is_empty() && !allow_no_files {
        return Err(
            "no certificates (give `certificates` or a `dir` with NAME.crt + NAME.key)".into(),
        );
    }
    let store = build_store(files.clone());
    for (src, names) in store.describe() {
        log::info!(
            "listener {name}: certificate {src} for {}",
            names.join(", ")
        );
    }
    let sni = Arc::new(Sni {
        store: ArcSwap::from_pointee(store),
        listener: name.to_string(),
        files: ArcSwap::from_pointee(files),
        memory: ArcSwap::from_pointee(vec![]),
        rebuild: std::sync::Mutex::new(()),
    });
    let mut s = TlsSettings::with_callbacks(Box::new(Callbacks(Arc::clone(&sni))))
        .map_err(|e| format!("listener {name}: {e}"))?;
    let min = match tls.min_version.as_deref() {
        Some("1.3") => SslVersion::TLS1_3,
        _ => SslVersion::TLS1_2,
    };
    s.set_min_proto_version(Some(min))
        .map_err(|e| e.to_string())?;
    s.set_max_proto_version(Some(SslVersion::TLS1_3))
        .map_err(|e| e.to_string())?;
    s.set_cipher_list(CIPHERS_TLS12)
        .map_err(|e| e.to_string())?;
    if let Some(ca) = &tls.client_ca {
        s.set_ca_file(ca)
            .map_err(|e| format!("listener {name}: client_ca {ca}: {e}"))?;
        let required = tls.client_auth.as_deref() != Some("optional");
        let mode = if required {
            SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
        } else {
            SslVerifyMode::PEER
        };
        s.set_verify(mode);
        if let Ok(pem) = std::fs::read(ca) {
            if let Ok(cas) = X509::stack_from_pem(&pem) {
                for c in cas {
                    let _ = s.add_client_ca(&c);
                }
            }
        }
    }
    if http2 {
        s.enable_h2();
    }
    Ok((s, sni))
}

/// Reloads a listener's certificates; a bad set is refused and the old one stays.
pub fn reload(sni: &Sni, tls: &ListenerTls) -> Result<(), String> {
    let files = load_files(tls)?;
    if files.is_empty() && sni.memory.load().is_empty() {
        return Err(
            "no certificates (give `certificates` or a `dir` with NAME.crt + NAME.key)".into(),
        );
    }
    sni.files.store(Arc::new(files));
    sni.rebuild_store();
    log::info!("listener {}: certificates reloaded", sni.listener);
    Ok(())
}

/// Watches the certificate files (and folder) of each TLS listener and reloads on
/// change (debounced).
pub fn watch(listeners: Vec<(Arc<Sni>, ListenerTls)>) {
    use notify::{RecursiveMode, Watcher};
    if listeners.is_empty() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher =
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("cannot watch certificates: {e}");
                return;
            }
        };
    let mut dirs: Vec<PathBuf> = vec![];
    for (_, tls) in &listeners {
        for (c, k) in cert_files(tls) {
            for p in [c, k] {
                let d = p
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
        if let Some(d) = &tls.dir {
            let d = PathBuf::from(d);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    for d in &dirs {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            log::warn!("cannot watch {}: {e}", d.display());
        }
    }
    let _ = std::thread::Builder::new()
        .name("cert-watch".into())
        .spawn(move || {
            let _keep = watcher;
            while rx.recv().is_ok() {
                while rx
                    .recv_timeout(std::time::Duration::from_millis(200))
                    .is_ok()
                {}
                for (sni, tls) in &listeners {
                    if let Err(e) = reload(sni, tls) {
                        log::error!(
                            "listener {}: certificate reload refused, keeping the old ones: {e}",
                            sni.listener
                        );
                    }
                }
            }
        });
}
