//! The Kubernetes control plane of the end-to-end tests: `kube-apiserver` and
//! `kube-controller-manager` built from Debian's `kubernetes` source package.
//!
//! No registry reachable from here ships these binaries, but Debian 12 ships the
//! full 1.20.2 source tree with its `vendor/`, which Debian's Go builds offline
//! (see /work/shared/notes/kubernetes-here.md). The result is cached under
//! `~/.cache/warren/kubernetes-<source version>/bin/`, where the tests look
//! (`warren_tests::controlplane::bin_dir`).
//!
//! A child module of `setup` (declared there with `#[path]`), so that it reports
//! through the same [`Report`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use warren_tests::controlplane::{self, APISERVER, CONTROLLER_MANAGER};

use super::{Report, status};

/// The only source apt may use here: the machine's own apt sources stay untouched.
const DEB_SRC: &str = "deb-src http://deb.debian.org/debian bookworm main";
const SOURCE_PACKAGE: &str = "kubernetes";
/// The vendored v1.0.1 panics under Go >= 1.18 (nil pointer in
/// `reflect2.(*frozenConfig).Type2`, e.g. on every TokenReview); v1.0.2 from
/// `golang-github-modern-go-reflect2-dev` fixes it.
const REFLECT2_VENDORED: &str = "vendor/github.com/modern-go/reflect2";
const REFLECT2_FIXED: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

/// Builds the two binaries unless a cached build is found.
pub(super) fn control_plane(report: &mut Report) -> Result<()> {
    let dir = controlplane::bin_dir();
    if has_binaries(&dir) {
        report.ok(format!(
            "{APISERVER} and {CONTROLLER_MANAGER} in {}",
            dir.display()
        ));
        return Ok(());
    }
    report.action(format!(
        "building {APISERVER} and {CONTROLLER_MANAGER} from Debian's {SOURCE_PACKAGE} \
         source package (about 6 minutes on 2 cores)"
    ));
    let cache = controlplane::cache_root();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // Next to the cache, so that the finished binaries are renamed into place, never copied.
    let work = cache.join(format!("kubernetes-build-{}", std::process::id()));
    let result = build_in(&work, &cache);
    // The tree is about 2 GB once built; it is never reused.
    if work.exists()
        && let Err(err) = fs::remove_dir_all(&work)
    {
        println!("setup: could not remove {}: {err}", work.display());
    }
    let bin = result?;
    println!("setup: control plane binaries in {}", bin.display());
    Ok(())
}

fn has_binaries(dir: &Path) -> bool {
    [APISERVER, CONTROLLER_MANAGER]
        .iter()
        .all(|bin| dir.join(bin).is_file())
}

/// Fetches, fixes and builds the source in `work`; returns the cached bin directory.
fn build_in(work: &Path, cache: &Path) -> Result<PathBuf> {
    if work.exists() {
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    }
    let src = work.join("src");
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let version = fetch_source(work, &src)?;
    let tree = unpack(&src)?;
    replace_reflect2(&tree)?;

    let mut make = Command::new("make");
    make.current_dir(&tree)
        .arg(format!("WHAT=cmd/{APISERVER} cmd/{CONTROLLER_MANAGER}"))
        // Static binaries, GOPATH mode with the vendored tree, never the network.
        .env("CGO_ENABLED", "0")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "");
    status(make).context("building the Kubernetes control plane")?;

    let target = cache.join(format!("kubernetes-{version}"));
    let bin = target.join("bin");
    let partial = target.join(format!("bin.partial-{}", std::process::id()));
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    for name in [APISERVER, CONTROLLER_MANAGER] {
        let built = tree.join("_output/bin").join(name);
        fs::rename(&built, partial.join(name))
            .with_context(|| format!("moving {} into the cache", built.display()))?;
    }
    // An incomplete bin/ of an interrupted run is replaced; a complete one was found above.
    if bin.exists() {
        fs::remove_dir_all(&bin).with_context(|| format!("removing {}", bin.display()))?;
    }
    fs::rename(&partial, &bin)
        .with_context(|| format!("renaming {} to {}", partial.display(), bin.display()))?;
    Ok(bin)
}

/// Downloads the source package into `src` through a private apt state in `work`,
/// returning its version.
fn fetch_source(work: &Path, src: &Path) -> Result<String> {
    let apt = work.join("apt");
    let sources = apt.join("sources.list");
    let lists = apt.join("lists");
    let cache = apt.join("cache");
    for dir in [lists.join("partial"), cache.join("archives/partial")] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&sources, format!("{DEB_SRC}\n"))
        .with_context(|| format!("writing {}", sources.display()))?;
    let apt_get = || {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-q")
            // The private directories belong to root; apt's _apt sandbox could not read them.
            .args(["-o", "APT::Sandbox::User=root"])
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", sources.display()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", lists.display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", cache.display()));
        cmd
    };
    let mut update = apt_get();
    update.arg("update");
    status(update).context("reading the Debian source index")?;
    let mut source = apt_get();
    source
        .args(["source", "--download-only", SOURCE_PACKAGE])
        .current_dir(src);
    status(source).context("downloading the kubernetes source package")?;

    let dsc = only_entry(src, |name| name.ends_with(".dsc"))?;
    source_version(&dsc).with_context(|| format!("no version in the name {dsc:?}"))
}

/// "kubernetes_1.20.5+really1.20.2-1.1+deb12u1.dsc" -> "1.20.5+really1.20.2-1.1+deb12u1".
fn source_version(dsc_name: &str) -> Option<String> {
    let version = dsc_name
        .strip_prefix(SOURCE_PACKAGE)?
        .strip_prefix('_')?
        .strip_suffix(".dsc")?;
    (!version.is_empty() && !version.contains('/')).then(|| version.to_owned())
}

/// Unpacks the upstream tarball (Debian's patches only touch kubectl's printing) and
/// returns the tree.
fn unpack(src: &Path) -> Result<PathBuf> {
    let orig = only_entry(src, |name| name.ends_with(".orig.tar.gz"))?;
    let mut tar = Command::new("tar");
    tar.current_dir(src).args(["xzf", &orig]);
    status(tar).with_context(|| format!("unpacking {orig}"))?;
    let tree = only_entry(src, |name| src.join(name).is_dir())?;
    Ok(src.join(tree))
}

fn replace_reflect2(tree: &Path) -> Result<()> {
    let fixed = Path::new(REFLECT2_FIXED);
    ensure!(
        fixed.join("reflect2.go").is_file(),
        "{REFLECT2_FIXED} is missing: is golang-github-modern-go-reflect2-dev installed?"
    );
    let vendored = tree.join(REFLECT2_VENDORED);
    fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    fs::create_dir(&vendored).with_context(|| format!("creating {}", vendored.display()))?;
    for entry in fs::read_dir(fixed).with_context(|| format!("listing {REFLECT2_FIXED}"))? {
        let entry = entry.with_context(|| format!("listing {REFLECT2_FIXED}"))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        // Tests would pull test-only imports into the GOPATH build.
        if !entry.path().is_file() || name_str.ends_with("_test.go") {
            continue;
        }
        fs::copy(entry.path(), vendored.join(&name))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

/// The name of the single entry of `dir` that `pick` accepts.
fn only_entry(dir: &Path, pick: impl Fn(&str) -> bool) -> Result<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .file_name();
        let name = name.to_string_lossy().into_owned();
        if pick(&name) {
            found.push(name);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one matching entry in {}, found {found:?}",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_source_version_from_the_dsc_name() {
        assert_eq!(
            source_version("kubernetes_1.20.5+really1.20.2-1.1+deb12u1.dsc").as_deref(),
            Some("1.20.5+really1.20.2-1.1+deb12u1")
        );
        assert_eq!(source_version("kubernetes_.dsc"), None);
        assert_eq!(source_version("etcd_3.4.23-4.dsc"), None);
        assert_eq!(source_version("kubernetes_1.20.2.orig.tar.gz"), None);
    }
}
