//! Reading and writing the CA's certificates and keys.

use std::{
    fs,
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::CaError;

/// Mode of private key files: the owner's alone.
pub(super) const KEY_MODE: u32 = 0o600;
/// Mode of certificates and CSRs, which are public.
pub(super) const PUBLIC_MODE: u32 = 0o644;

/// Reads a PEM private key, refusing a file that anyone but its owner can
/// read: a CA key others could copy would let them mint any identity.
pub(super) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CaError> {
    let read_error = |source| CaError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::File::open(path).map_err(read_error)?;
    // The mode of the file we opened, not of whatever the name points to by
    // the time we look.
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(read_error)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CaError::BadKey {
        path: path.to_owned(),
        reason: format!("no PEM private key found ({e})"),
    })
}

/// Every PEM certificate in a file, in order.
pub(super) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| CaError::BadCertificate {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// Refuses if any of `paths` exists, naming every one, so that a second
/// `init` can never replace keys that certificates out there depend on.
pub(super) fn refuse_existing(paths: &[&Path]) -> Result<(), CaError> {
    let existing: Vec<PathBuf> = paths
        .iter()
        .filter(|path| path.symlink_metadata().is_ok())
        .map(|path| path.to_path_buf())
        .collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(CaError::Exists(existing))
    }
}

/// Creates `path` holding `contents` (see [`crate::files::create_new`]),
/// never replacing an existing file.
pub(super) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    match crate::files::create_new(path, contents, mode) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CaError::Exists(vec![path.to_owned()])),
        Err(source) => Err(CaError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

pub(super) fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })
}
