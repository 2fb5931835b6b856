//! Noticing that files changed: the agent's config and trust bundle, the
//! CA's workloads file.

use std::path::{Path, PathBuf};

use notify::Watcher as _;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {source}", path.display())]
pub struct WatchError {
    path: PathBuf,
    source: notify::Error,
}

/// Reports which of `paths` changed; a path that is a directory changes
/// when any file in it does. Watches files' directories, since
/// editors and config management replace files rather than write them in
/// place, and Kubernetes updates a mounted ConfigMap or Secret by swapping a
/// `..data` symlink in its directory, an event that names no file of ours.
pub fn watch_files(
    paths: &[PathBuf],
    tx: mpsc::UnboundedSender<PathBuf>,
) -> Result<notify::RecommendedWatcher, WatchError> {
    let targets: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let originals = paths.to_vec();
    let watched = targets.clone();
    let dirs_given: Vec<bool> = targets.iter().map(|t| t.is_dir()).collect();
    let is_dir = dirs_given.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        for ((target, original), is_dir) in watched.iter().zip(&originals).zip(&dirs_given) {
            let swapped = |path: &PathBuf| {
                path.parent() == target.parent()
                    && path
                        .file_name()
                        .is_some_and(|name| name.to_string_lossy().starts_with(".."))
            };
            let inside = |path: &PathBuf| *is_dir && path.parent() == Some(target.as_path());
            if event
                .paths
                .iter()
                .any(|p| p == target || swapped(p) || inside(p))
            {
                let _ = tx.send(original.clone());
            }
        }
    })
    .map_err(|source| WatchError {
        path: paths[0].clone(),
        source,
    })?;
    let mut dirs: Vec<&Path> = Vec::new();
    for ((target, path), is_dir) in targets.iter().zip(paths).zip(is_dir) {
        let dir = if is_dir {
            target.as_path()
        } else {
            target.parent().unwrap_or(Path::new("/"))
        };
        if dirs.contains(&dir) {
            continue;
        }
        dirs.push(dir);
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| WatchError {
                path: path.clone(),
                source,
            })?;
    }
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use std::{fs, time::Duration};

    use super::*;

    async fn next(rx: &mut mpsc::UnboundedReceiver<PathBuf>) -> Option<PathBuf> {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn replaced_files_and_swapped_kubernetes_mounts_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca-roots.pem");
        fs::write(&bundle, "one").unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watcher = watch_files(std::slice::from_ref(&bundle), tx).unwrap();

        // Replaced by rename, as config management does.
        let new = dir.path().join("ca-roots.pem.new");
        fs::write(&new, "two").unwrap();
        fs::rename(&new, &bundle).unwrap();
        assert_eq!(next(&mut rx).await.as_ref(), Some(&bundle));
        // A rename comes as several events; let them all arrive.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {}

        // A file that is not ours is ignored.
        fs::write(dir.path().join("other.log"), "noise").unwrap();
        assert_eq!(next(&mut rx).await, None);

        // Kubernetes: the `..data` symlink is swapped to a new directory.
        std::os::unix::fs::symlink("..2026", dir.path().join("..data_tmp")).unwrap();
        fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert_eq!(next(&mut rx).await.as_ref(), Some(&bundle));
    }
}
