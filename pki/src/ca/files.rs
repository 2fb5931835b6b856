//! Reading and writing the CA's certificates and keys, and node credentials:
//! files that may hold secrets, so each is written whole with its final mode.

use std::{
    fs,
    io::{self, Read, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::CaError;

/// Mode of private key files: the owner's alone.
pub(super) const KEY_MODE: u32 = 0o600;
/// Mode of certificates and CSRs, which are public.
pub(super) const PUBLIC_MODE: u32 = 0o644;

/// Who may be able to read a CA key file besides its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyReaders {
    /// Nobody: mode 0600 or 0400.
    Owner,
    /// Also the file's group, if this process is in it: a Kubernetes Secret
    /// mounted for a non-root process (`fsGroup`) is 0440, of the pod's
    /// group. Others still may not read it, nor the group write it.
    OwnerAndOwnGroup,
}

/// Reads a PEM private key, refusing a file that anyone but its owner (and,
/// with [`KeyReaders::OwnerAndOwnGroup`], our own group) can read: a CA key
/// others could copy would let them mint any identity.
pub(crate) fn read_private_key(
    path: &Path,
    readers: KeyReaders,
) -> Result<PrivateKeyDer<'static>, CaError> {
    let read_error = |source| CaError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::File::open(path).map_err(read_error)?;
    // The mode of the file we opened, not of whatever the name points to by
    // the time we look.
    let metadata = file.metadata().map_err(read_error)?;
    let mode = metadata.permissions().mode() & 0o777;
    let group_ok =
        readers == KeyReaders::OwnerAndOwnGroup && mode & 0o030 == 0 && in_group(metadata.gid());
    if mode & 0o007 != 0 || (mode & 0o070 != 0 && !group_ok) {
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

/// Whether this process is in group `gid` (effective or supplementary).
fn in_group(gid: u32) -> bool {
    let gid = nix::unistd::Gid::from_raw(gid);
    nix::unistd::getegid() == gid
        || nix::unistd::getgroups().is_ok_and(|groups| groups.contains(&gid))
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

/// Creates `path` holding `contents` (see [`create_new`]), never replacing
/// an existing file.
pub(super) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    match create_new(path, contents, mode) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CaError::Exists(vec![path.to_owned()])),
        Err(source) => Err(CaError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates `path` holding `contents` unless a file has that name by now;
/// either way, `path` then holds a complete file (see [`create_new`]).
pub(super) fn publish(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    create_new(path, contents, mode)
        .map(|_created| ())
        .map_err(|source| CaError::Write {
            path: path.to_owned(),
            source,
        })
}

pub(super) fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Creates `path` holding `contents`, never replacing an existing file.
/// Returns false, having written nothing, if `path` already exists.
///
/// The file is written under a temporary name with its final mode and only
/// then given its name: a key is never readable by others, not even briefly,
/// and a crash never leaves a half-written file under the real name. Two
/// processes racing to create the same file cannot both succeed.
pub(super) fn create_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    match written_beside(path, contents, mode)?.persist_noclobber(path) {
        Ok(_) => Ok(true),
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.error),
    }
}

/// Puts `contents` at `path` in one step, replacing any file there: readers
/// see the old file or the new one, never a mix, and a key is never readable
/// by others (see [`create_new`]).
pub(super) fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    written_beside(path, contents, mode)?
        .persist(path)
        .map_err(|e| e.error)?;
    Ok(())
}

/// A temporary file in `path`'s directory, with mode `mode` from the start,
/// holding `contents` on disk: ready to be given `path`'s name.
fn written_beside(path: &Path, contents: &[u8], mode: u32) -> io::Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".warren-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    temp.write_all(contents)?;
    temp.as_file().sync_all()?;
    Ok(temp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_the_mode_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        assert!(create_new(&path, b"first", 0o600).unwrap());
        assert!(!create_new(&path, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn replaces_with_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        assert!(create_new(&path, b"first", 0o644).unwrap());
        replace(&path, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
