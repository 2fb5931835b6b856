//! `cargo xtask image`: OCI images of the agent and of the CA, built from scratch.
//!
//! No registry can be reached from the machines that build warren, so no image
//! starts `FROM` an upstream one. Each image is a single layer made here: the
//! release binary (debug info stripped, symbols kept so that a backtrace names
//! functions), exactly the shared libraries and loader that `ldd` names for it,
//! the Debian copyright files of the packages those libraries come from, and an
//! empty world-writable /tmp. No shell, no package manager, no /etc/passwd.
//!
//! The binaries link glibc dynamically: the only Rust target installed is
//! x86_64-unknown-linux-gnu, and rustup cannot fetch the musl one here. glibc
//! 2.34 and later carry the `files` and `dns` NSS modules inside libc.so.6, so
//! name resolution (the agent dials its CA by DNS name) needs no other library.
//!
//! GNU tar writes the layer (sorted, owned by 0:0, dated at HEAD's commit) so
//! that the same binaries give the same digests; umoci assembles the OCI layout
//! around it; skopeo writes it as an oci-archive named with the image's full
//! reference. Then each archive is loaded into a private podman store and run
//! there: `--version`, `--help`, and a `/bin/sh` that must not exist.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// Registry and namespace the images are named under inside the archives:
    /// `<registry>/<image>:<version>`.
    #[arg(long, default_value = "ghcr.io/warren-mesh")]
    registry: String,
}

/// One image: which binary it carries and how it starts.
struct Image {
    /// The last part of the image's reference, and its title label.
    name: &'static str,
    package: &'static str,
    bin: &'static str,
    /// Default arguments; manifests usually give their own.
    cmd: &'static [&'static str],
    /// `uid:gid` the entrypoint runs as; `None` keeps the runtime's default, root.
    user: Option<&'static str>,
    ports: &'static [&'static str],
    /// Binaries the image carries for the host, beside the entrypoint:
    /// (package, binary). Linked statically (`crt-static`), because the host
    /// runs them with its own C library, whatever its version.
    for_host: &'static [(&'static str, &'static str)],
}

/// The target the host binaries are built for (explicit, so that `crt-static`
/// applies to them and not to build scripts).
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

const IMAGES: [Image; 2] = [
    // Root: the agent loads eBPF programs, enters pods' network namespaces and
    // binds transparent sockets (its pod gets the capabilities it needs).
    Image {
        name: "warren-agent",
        package: "warren-agent",
        bin: "warren",
        cmd: &["agent", "--config", "/etc/warren/config.yaml"],
        user: None,
        ports: &[],
        // The CNI plugin, which the agent copies to the node's CNI bin dir.
        for_host: &[("warren-cni", "warren-cni")],
    },
    // No default command: which signing material and which way agents
    // authenticate are the deployment's choice (`serve --cacerts ... --kubernetes`).
    Image {
        name: "warren-ca",
        package: "warren-ca",
        bin: "warren-ca",
        cmd: &[],
        user: Some("65532:65532"),
        ports: &["15012/tcp", "15021/tcp"],
        for_host: &[],
    },
];

/// Basenames that would give an image a shell or a package manager.
const FORBIDDEN: &[&str] = &[
    "sh", "bash", "dash", "ash", "zsh", "busybox", "toybox", "apt", "apt-get", "dpkg", "apk",
    "yum", "dnf", "rpm", "microdnf",
];

/// The external tools this command runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("strip", "binutils"),
];

/// Where the sources and the binaries come from, for the labels.
struct Source {
    revision: String,
    /// HEAD's commit time, RFC 3339 in UTC, and as seconds since the epoch.
    created: String,
    epoch: String,
    repository: String,
}

/// A cargo package's metadata, from `cargo metadata`.
struct Package {
    version: String,
    license: Option<String>,
    description: Option<String>,
}

/// What building an image produced.
struct Built {
    reference: String,
    archive: PathBuf,
    /// The image's single layer blob, gzip-compressed, inside `layout`.
    layer: PathBuf,
    layer_compressed: u64,
    layer_unpacked: u64,
    binary: u64,
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    check_tools()?;
    let uid = output(Command::new("id").arg("-u"))?;
    if uid.trim() != "0" {
        bail!(
            "cargo xtask image checks each image by running it with podman, which needs root \
             here (uid is {}): try `sudo -E cargo xtask image`",
            uid.trim()
        );
    }
    let root = crate::workspace_root();
    let metadata = cargo_metadata(&root)?;
    let target_dir = PathBuf::from(
        metadata["target_directory"]
            .as_str()
            .context("cargo metadata gives no target_directory")?,
    );
    let mut images = Vec::new();
    for image in &IMAGES {
        match package(&metadata, image.package) {
            Some(package) => images.push((image, package)),
            None => println!(
                "image: skipping {}: the workspace has no package {} yet",
                image.name, image.package
            ),
        }
    }
    if images.is_empty() {
        bail!("none of the images' packages is in the workspace");
    }
    let source = source(&root)?;

    println!("\n== release build");
    let build_started = Instant::now();
    let mut cargo = vec!["build", "--release"];
    for (image, _) in &images {
        cargo.extend(["-p", image.package, "--bin", image.bin]);
    }
    crate::cargo(&cargo, &[])?;
    let static_dir = target_dir.join("static");
    for (image, _) in &images {
        for (package, bin) in image.for_host {
            crate::cargo(
                &[
                    "build",
                    "--release",
                    "-p",
                    package,
                    "--bin",
                    bin,
                    "--target",
                    HOST_TARGET,
                    "--target-dir",
                    &path_str(&static_dir)?,
                ],
                &[("RUSTFLAGS", "-C target-feature=+crt-static")],
            )?;
        }
    }
    let build_secs = build_started.elapsed().as_secs_f64();

    let out = target_dir.join("images");
    let mut built = Vec::new();
    for (image, package) in &images {
        println!("\n== image {}", image.name);
        let binary = target_dir.join("release").join(image.bin);
        let host_bins: Vec<PathBuf> = image
            .for_host
            .iter()
            .map(|(_, bin)| static_dir.join(HOST_TARGET).join("release").join(bin))
            .collect();
        let b = build(
            image,
            package,
            &binary,
            &host_bins,
            &source,
            &args.registry,
            &out,
        )
        .with_context(|| format!("building the {} image", image.name))?;
        built.push(b);
    }

    println!("\n== checking the images with podman (runc, private store, no network)");
    let podman = Podman::new(out.join("work/podman"))?;
    for ((image, package), b) in images.iter().zip(&built) {
        check(image, package, b, &podman)
            .with_context(|| format!("checking the {} image", image.name))?;
    }
    podman.remove()?;

    println!("\n== images (MB = 10^6 bytes)");
    println!(
        "{:<44} {:>8} {:>10} {:>9} {:>8}  file",
        "reference", "archive", "layer.gz", "unpacked", "binary"
    );
    for b in &built {
        let archive_size = fs::metadata(&b.archive)?.len();
        println!(
            "{:<44} {:>8} {:>10} {:>9} {:>8}  {}",
            b.reference,
            mb(archive_size),
            mb(b.layer_compressed),
            mb(b.layer_unpacked),
            mb(b.binary),
            relative(&b.archive, &root).display()
        );
    }
    println!(
        "images: {} built and checked in {:.0} s (release build {:.0} s); revision {}",
        built.len(),
        started.elapsed().as_secs_f64(),
        build_secs,
        source.revision
    );
    Ok(())
}

fn check_tools() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| {
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .map(|&(_, package)| package)
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools from the Debian packages {}: run `cargo xtask setup`",
            missing.join(" ")
        );
    }
    Ok(())
}

fn build(
    image: &Image,
    package: &Package,
    binary: &Path,
    host_bins: &[PathBuf],
    source: &Source,
    registry: &str,
    out: &Path,
) -> Result<Built> {
    let version = &package.version;
    let work = out.join("work").join(image.name);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let rootfs = work.join("rootfs");

    // The binary, without the debug info a release build keeps (`debug = 1`).
    let entrypoint = format!("/usr/local/bin/{}", image.bin);
    let in_image = rootfs.join(entrypoint.trim_start_matches('/'));
    create_parent(&in_image)?;
    run_quiet(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&in_image)
            .arg(binary),
    )?;
    let binary_size = fs::metadata(&in_image)?.len();
    for host_bin in host_bins {
        let name = host_bin.file_name().context("a binary without a name")?;
        let dest = rootfs.join("usr/local/bin").join(name);
        run_quiet(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&dest)
                .arg(host_bin),
        )?;
        // Must need no library: the host runs it.
        let ldd = Command::new("ldd").arg(host_bin).output()?;
        if !parse_ldd(&String::from_utf8_lossy(&ldd.stdout))?.is_empty() {
            bail!("{} is not statically linked", host_bin.display());
        }
        println!(
            "image: /usr/local/bin/{} ({}, static, for the host)",
            name.to_string_lossy(),
            mb(fs::metadata(&dest)?.len())
        );
    }

    // Exactly the libraries the dynamic loader would map, at the paths it finds them.
    let ldd = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let libraries = parse_ldd(&String::from_utf8_lossy(&ldd.stdout))
        .with_context(|| format!("ldd {}", binary.display()))?;
    let mut packages = Vec::new();
    for library in &libraries {
        let dest = rootfs.join(library.strip_prefix("/")?);
        create_parent(&dest)?;
        // fs::copy follows symlinks and keeps the mode: a regular file lands where ldd names it.
        fs::copy(library, &dest).with_context(|| format!("copying {}", library.display()))?;
        let owner = output(Command::new("dpkg").arg("-S").arg(library))?;
        let owner = debian_package(&owner)
            .with_context(|| format!("no Debian package owns {}", library.display()))?;
        if !packages.contains(&owner) {
            packages.push(owner);
        }
    }
    // The libraries are Debian's builds: ship their licences with them.
    for owner in &packages {
        let copyright = Path::new("/usr/share/doc").join(owner).join("copyright");
        let dest = rootfs.join(copyright.strip_prefix("/")?);
        create_parent(&dest)?;
        fs::copy(&copyright, &dest).with_context(|| format!("copying {}", copyright.display()))?;
    }
    let tmp = rootfs.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    println!(
        "image: {} ({}), {}, Debian packages {}",
        entrypoint,
        mb(binary_size),
        if libraries.is_empty() {
            "statically linked".to_string()
        } else {
            format!("libraries {}", join_paths(&libraries))
        },
        packages.join(" ")
    );

    // One layer, byte for byte the same for the same files.
    let layer_tar = work.join("layer.tar");
    run_quiet(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg("--format=gnu")
            .arg(format!("--mtime=@{}", source.epoch))
            .arg("-cf")
            .arg(&layer_tar)
            .arg("."),
    )?;
    let layer_unpacked = fs::metadata(&layer_tar)?.len();

    // `umoci insert` (0.4.7) writes layers whose tar stream ends without its
    // end-of-archive blocks; `raw add-layer` takes this tar as it is.
    let layout = work.join("oci");
    let tagged = format!("{}:{version}", layout.display());
    run_quiet(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    )?;
    run_quiet(Command::new("umoci").args(["new", "--image", &tagged]))?;
    run_quiet(
        Command::new("umoci")
            .args(["raw", "add-layer", "--image", &tagged])
            .arg(format!("--history.created={}", source.created))
            .arg("--history.created_by=cargo xtask image")
            .arg(&layer_tar),
    )?;
    let mut config = Command::new("umoci");
    config
        .args(["config", "--image", &tagged, "--no-history"])
        .arg(format!("--created={}", source.created))
        .arg(format!("--config.entrypoint={entrypoint}"));
    for arg in image.cmd {
        config.arg(format!("--config.cmd={arg}"));
    }
    if let Some(user) = image.user {
        config.arg(format!("--config.user={user}"));
    }
    for port in image.ports {
        config.arg(format!("--config.exposedports={port}"));
    }
    // The same facts as config labels (what `podman inspect` shows) and as
    // manifest annotations (what registries show).
    for (key, value) in labels(image, package, source) {
        config.arg(format!(
            "--config.label=org.opencontainers.image.{key}={value}"
        ));
        config.arg(format!(
            "--manifest.annotation=org.opencontainers.image.{key}={value}"
        ));
    }
    run_quiet(&mut config)?;
    run_quiet(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;

    let manifest = read_manifest(&layout)?;
    let layers = manifest["layers"]
        .as_array()
        .context("manifest without layers")?;
    let [layer] = layers.as_slice() else {
        bail!("expected one layer, the manifest lists {}", layers.len());
    };
    let layer_compressed = layer["size"].as_u64().context("layer without size")?;
    let layer = blob(&layout, &layer["digest"])?;

    let reference = format!("{registry}/{}:{version}", image.name);
    let archive = out.join(format!("{}-{version}.oci.tar", image.name));
    if archive.exists() {
        fs::remove_file(&archive)?;
    }
    run_quiet(
        Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{tagged}"))
            .arg(format!("oci-archive:{}:{reference}", archive.display())),
    )?;
    println!(
        "image: {reference} -> {} (layer {} gzip, {} unpacked)",
        archive.display(),
        mb(layer_compressed),
        mb(layer_unpacked)
    );
    Ok(Built {
        reference,
        archive,
        layer,
        layer_compressed,
        layer_unpacked,
        binary: binary_size,
    })
}

/// The `org.opencontainers.image.*` labels, without that prefix.
fn labels(image: &Image, package: &Package, source: &Source) -> Vec<(&'static str, String)> {
    let mut labels = vec![
        ("title", image.name.to_string()),
        ("version", package.version.clone()),
        ("revision", source.revision.clone()),
        ("source", source.repository.clone()),
        ("created", source.created.clone()),
    ];
    if let Some(license) = &package.license {
        labels.push(("licenses", license.clone()));
    }
    if let Some(description) = &package.description {
        labels.push(("description", description.clone()));
    }
    labels
}

fn check(image: &Image, package: &Package, built: &Built, podman: &Podman) -> Result<()> {
    let version = &package.version;
    let entrypoint = format!("/usr/local/bin/{}", image.bin);

    // What the layer holds, read back from the image itself.
    let listing = output(Command::new("tar").arg("-tzf").arg(&built.layer))?;
    let paths: Vec<&str> = listing
        .lines()
        .map(|p| p.trim_start_matches('.').trim_end_matches('/'))
        .collect();
    if !paths.contains(&entrypoint.as_str()) {
        bail!("the layer has no {entrypoint}");
    }
    let forbidden: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| FORBIDDEN.contains(&p.rsplit('/').next().unwrap_or_default()))
        .collect();
    if !forbidden.is_empty() {
        bail!(
            "the image holds a shell or package manager: {}",
            forbidden.join(" ")
        );
    }
    let files = paths.iter().filter(|p| !p.is_empty()).count();
    println!(
        "check: {}: {files} entries in its layer, no shell or package manager",
        image.name
    );

    let loaded = podman.output(&["load", "--quiet", "--input", &path_str(&built.archive)?])?;
    if !loaded.contains(&built.reference) {
        bail!("podman loaded {:?}, not {}", loaded.trim(), built.reference);
    }

    let inspect = podman.output(&["image", "inspect", &built.reference])?;
    let inspect: Value = serde_json::from_str(&inspect).context("parsing podman image inspect")?;
    let config = &inspect[0]["Config"];
    let user = config["User"].as_str().unwrap_or_default();
    let wanted_user = image.user.unwrap_or_default();
    if user != wanted_user {
        bail!("the image runs as user {user:?}, not {wanted_user:?}");
    }
    if config["Entrypoint"] != serde_json::json!([entrypoint]) {
        bail!("the image's entrypoint is {}", config["Entrypoint"]);
    }
    let label = &config["Labels"]["org.opencontainers.image.version"];
    if label.as_str() != Some(version.as_str()) {
        bail!("the image's version label is {label}, not {version}");
    }
    println!(
        "check: {}: podman loaded it; entrypoint {entrypoint}, user {}, version label {version}",
        built.reference,
        if user.is_empty() {
            "root (default)"
        } else {
            user
        }
    );

    let printed = podman.run(&built.reference, &[], &["--version"])?;
    let wanted = format!("{} {version}", image.bin);
    if printed.trim() != wanted {
        bail!("`--version` printed {:?}, not {wanted:?}", printed.trim());
    }
    println!(
        "check: {}: `--version` printed {:?}",
        image.name,
        printed.trim()
    );

    let help = podman.run(&built.reference, &[], &["--help"])?;
    let usage = format!("Usage: {}", image.bin);
    if !help.contains(&usage) {
        bail!("`--help` did not print {usage:?}:\n{help}");
    }
    println!(
        "check: {}: `--help` printed {} lines starting {:?}",
        image.name,
        help.lines().count(),
        help.lines().next().unwrap_or_default()
    );

    for (_, bin) in image.for_host {
        let plugin = format!("/usr/local/bin/{bin}");
        if !paths.contains(&plugin.as_str()) {
            bail!("the layer has no {plugin}");
        }
        let answer = podman.run(
            &built.reference,
            &["--entrypoint", &plugin, "--env", "CNI_COMMAND=VERSION"],
            &[],
        )?;
        if !answer.contains("\"supportedVersions\"") {
            bail!("{plugin} VERSION printed {answer:?}");
        }
        println!("check: {}: {plugin} VERSION: {}", image.name, answer.trim());
    }

    // The runtime itself finds no shell to start.
    let shell = podman.run_output(
        &built.reference,
        &["--entrypoint", "/bin/sh"],
        &["-c", "true"],
    )?;
    if shell.status.success() {
        bail!("/bin/sh ran in the image");
    }
    println!(
        "check: {}: `--entrypoint /bin/sh` fails ({}): {}",
        image.name,
        shell.status,
        String::from_utf8_lossy(&shell.stderr)
            .lines()
            .last()
            .unwrap_or_default()
    );
    Ok(())
}

/// podman with a store of its own under target/images, so checks neither see
/// nor leave images in the machine's store.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new(dir: PathBuf) -> Result<Podman> {
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir)?;
        Ok(Podman { dir })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            // vfs: no overlay mounts to need or leave behind.
            .args(["--storage-driver", "vfs"])
            // crun 1.8 refuses these machines' hybrid cgroup layout (v1
            // controllers, cgroup2 at /sys/fs/cgroup/unified); runc runs there.
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "none"]);
        cmd
    }

    fn output(&self, args: &[&str]) -> Result<String> {
        output(self.command().args(args))
    }

    /// `podman run` of the image's entrypoint with `args`; its stdout.
    fn run(&self, reference: &str, options: &[&str], args: &[&str]) -> Result<String> {
        let out = self.run_output(reference, options, args)?;
        if !out.status.success() {
            bail!(
                "podman run {reference} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run_output(&self, reference: &str, options: &[&str], args: &[&str]) -> Result<Output> {
        self.command()
            .args(["run", "--rm", "--network", "none"])
            // Podman asks for 1048576 open files and 4194304 processes by
            // default; without CAP_SYS_RESOURCE (as in this sandbox) the runtime
            // cannot raise its hard limits that far and fails with EPERM.
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(options)
            .arg(reference)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running podman")
    }

    fn remove(self) -> Result<()> {
        // `podman run --rm` can return while its cleanup still writes under
        // the run root: a removal racing it finds the directory not empty.
        let mut tries = 0;
        loop {
            match fs::remove_dir_all(&self.dir) {
                Err(error) if tries < 10 && error.raw_os_error() == Some(libc_enotempty()) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                result => {
                    return result.with_context(|| format!("removing {}", self.dir.display()));
                }
            }
        }
    }
}

/// ENOTEMPTY on Linux (xtask does not depend on libc).
const fn libc_enotempty() -> i32 {
    39
}

fn cargo_metadata(root: &Path) -> Result<Value> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let text = output(
        Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(root),
    )?;
    serde_json::from_str(&text).context("parsing cargo metadata")
}

fn package(metadata: &Value, name: &str) -> Option<Package> {
    let package = metadata["packages"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?;
    let text = |key: &str| package[key].as_str().map(str::to_string);
    Some(Package {
        version: text("version")?,
        license: text("license"),
        description: text("description"),
    })
}

fn source(root: &Path) -> Result<Source> {
    let git = || {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(root);
        cmd
    };
    let mut revision = output(git().args(["rev-parse", "HEAD"]))?
        .trim()
        .to_string();
    // Binaries built from uncommitted changes are not HEAD's: say so.
    if !output(git().args(["status", "--porcelain"]))?
        .trim()
        .is_empty()
    {
        revision.push_str("-dirty");
    }
    // HEAD's commit time dates the image and its files, so that rebuilding the
    // same binaries gives the same digests.
    let dates = output(
        git()
            .args(["show", "-s", "--date=format-local:%Y-%m-%dT%H:%M:%SZ"])
            .args(["--format=%ct %cd", "HEAD"])
            .env("TZ", "UTC"),
    )?;
    let (epoch, created) = dates
        .trim()
        .split_once(' ')
        .with_context(|| format!("unexpected `git show` output {dates:?}"))?;
    let manifest = root.join("Cargo.toml");
    let manifest =
        fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let repository = workspace_package_field(&manifest, "repository")
        .context("Cargo.toml's [workspace.package] has no repository")?;
    Ok(Source {
        revision,
        created: created.to_string(),
        epoch: epoch.to_string(),
        repository,
    })
}

/// A string field of `[workspace.package]`; enough TOML for this workspace's manifest.
fn workspace_package_field(manifest: &str, key: &str) -> Option<String> {
    let mut in_section = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
            continue;
        }
        let Some((k, value)) = line.split_once('=') else {
            continue;
        };
        if in_section && k.trim() == key {
            return Some(value.trim().trim_matches('"').to_string());
        }
    }
    None
}

/// The files `ldd` names: each resolved library and the program interpreter.
/// Empty for a static binary; an error if a library is not found.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)", or "linux-vdso.so.1 (0x...)" (in the kernel).
        let path = match line.split_once("=>") {
            Some((name, resolved)) => {
                let resolved = resolved.split_whitespace().next().unwrap_or_default();
                if resolved == "not" {
                    bail!("shared library {} not found", name.trim());
                }
                resolved
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    if paths.is_empty() {
        bail!("no libraries in ldd's output {text:?}");
    }
    Ok(paths)
}

/// "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6" -> "libc6".
fn debian_package(dpkg_search: &str) -> Option<String> {
    let (owner, _) = dpkg_search.lines().next()?.split_once(": ")?;
    let name = owner.split(':').next()?.trim();
    let single = !name.is_empty() && !name.contains([',', ' ']);
    single.then(|| name.to_string())
}

fn read_manifest(layout: &Path) -> Result<Value> {
    let index = fs::read_to_string(layout.join("index.json")).context("reading index.json")?;
    let index: Value = serde_json::from_str(&index)?;
    let manifests = index["manifests"]
        .as_array()
        .context("index without manifests")?;
    let [manifest] = manifests.as_slice() else {
        bail!("expected one manifest in {}", layout.display());
    };
    let manifest = fs::read_to_string(blob(layout, &manifest["digest"])?)?;
    Ok(serde_json::from_str(&manifest)?)
}

fn blob(layout: &Path, digest: &Value) -> Result<PathBuf> {
    let digest = digest.as_str().context("descriptor without digest")?;
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unexpected digest {digest}"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().context("path without parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

fn join_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(" ")
}

fn relative<'a>(path: &'a Path, root: &Path) -> &'a Path {
    path.strip_prefix(root).unwrap_or(path)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Runs a command, failing with its stderr; returns its stdout.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd1b9f2000)\n\
             \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f16f9428000)\n\
             \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f16f7c1e000)\n\
             \t/lib64/ld-linux-x86-64.so.2 (0x00007f16f945b000)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert_eq!(missing.to_string(), "shared library libfoo.so.1 not found");
    }

    #[test]
    fn reads_dpkg_owner() {
        let line = "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6\n";
        assert_eq!(debian_package(line).as_deref(), Some("libc6"));
        assert_eq!(
            debian_package("libgcc-s1: /lib/x86_64-linux-gnu/libgcc_s.so.1").as_deref(),
            Some("libgcc-s1")
        );
        // A diversion or several owners: no single package to credit.
        assert_eq!(debian_package("libc6, libc6-dev: /usr/include"), None);
    }

    #[test]
    fn reads_workspace_package_fields() {
        let manifest = "[package]\nrepository = \"no\"\n\n[workspace.package]\n\
                        version = \"0.1.0\"\nrepository = \"https://example.org/w\"\n[x]\n";
        assert_eq!(
            workspace_package_field(manifest, "repository").as_deref(),
            Some("https://example.org/w")
        );
        assert_eq!(workspace_package_field(manifest, "license"), None);
    }
}
