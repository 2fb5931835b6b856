//! Creating and replacing files that may hold secrets (CA keys, roots).

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
};

/// Creates `path` holding `contents`, never replacing an existing file.
/// Returns false, having written nothing, if `path` already exists.
///
/// The file is written under a temporary name with its final mode and only
/// then given its name: a key is never readable by others, not even briefly,
/// and a crash never leaves a half-written file under the real name. Two
/// processes racing to create the same file cannot both succeed.
pub fn create_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    match written_beside(path, contents, mode)?.persist_noclobber(path) {
        Ok(_) => Ok(true),
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.error),
    }
}

/// Puts `contents` at `path` in one step, replacing any file there: readers
/// see the old file or the new one, never a mix, and a key is never readable
/// by others (see [`create_new`]).
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
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
