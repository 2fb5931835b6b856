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

/// Reports which of `paths` changed. Watches their directories, since
/// editors and config management replace files rather than write them in
/// place.
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
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        for (target, original) in watched.iter().zip(&originals) {
            if event.paths.contains(target) {
                let _ = tx.send(original.clone());
            }
        }
    })
    .map_err(|source| WatchError {
        path: paths[0].clone(),
        source,
    })?;
    let mut dirs: Vec<&Path> = Vec::new();
    for (target, path) in targets.iter().zip(paths) {
        let dir = target.parent().unwrap_or(Path::new("/"));
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
