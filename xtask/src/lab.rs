//! `cargo xtask lab`: a lab that outlives the command, with an agent on every
//! node and every pod enrolled, for trying things by hand.

use std::{fs, path::PathBuf, process::Stdio};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use warren_tests::{
    Lab, LabSpec,
    harness::{MeshWorkload, agent_config, binary},
};

#[derive(Subcommand)]
pub enum Action {
    /// Create the lab and start an agent on each node.
    Up {
        #[arg(long, default_value = "dev")]
        name: String,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Release builds, as the bench runs them: for profiling by hand.
        #[arg(long)]
        release: bool,
    },
    /// Stop the agents and remove the lab.
    Down {
        #[arg(long, default_value = "dev")]
        name: String,
    },
    /// Describe the lab.
    Status {
        #[arg(long, default_value = "dev")]
        name: String,
    },
    /// Run a command inside a pod (its network namespace and its cgroup, so
    /// its connections are captured), e.g. `lab exec n1p1 -- curl 10.244.2.2`.
    Exec {
        #[arg(long, default_value = "dev")]
        name: String,
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// Where each node's agent serves its Prometheus metrics, on the node's
/// address.
const METRICS_PORT: u16 = 15020;

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Up {
            name,
            nodes,
            pods,
            release,
        } => up(
            &name,
            if release {
                crate::Profile::Release
            } else {
                crate::Profile::Debug
            },
            LabSpec {
                nodes,
                pods_per_node: pods,
            },
        ),
        Action::Down { name } => {
            let removed = Lab::down_named(&name)?;
            let _ = fs::remove_dir_all(files_dir(&name));
            println!(
                "{}",
                if removed {
                    "lab removed"
                } else {
                    "no such lab"
                }
            );
            Ok(())
        }
        Action::Status { name } => {
            match Lab::status_named(&name)? {
                Some(text) => {
                    print!("{text}");
                    println!("agent configs and logs: {}", files_dir(&name).display());
                }
                None => println!("no lab named {name}"),
            }
            Ok(())
        }
        Action::Exec { name, pod, command } => {
            let lab = Lab::open_named(&name)?.with_context(|| format!("no lab named {name}"))?;
            let pod = lab
                .pod_by_name(&pod)
                .with_context(|| format!("lab {name} has no pod {pod}"))?;
            let status = pod.try_command(&command[0])?.args(&command[1..]).status()?;
            if !status.success() {
                bail!("{} exited with {status}", command[0]);
            }
            Ok(())
        }
    }
}

fn files_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/warren-lab").join(name)
}

fn up(name: &str, profile: crate::Profile, spec: LabSpec) -> Result<()> {
    crate::setup::run(true)?;
    let bin_dir = crate::build(profile)?;
    // SAFETY: xtask has spawned no thread yet, so no one reads the environment
    // concurrently. harness::binary() finds the builds through this variable.
    unsafe { std::env::set_var("WARREN_BIN_DIR", &bin_dir) };
    let lab = Lab::up_named(name, spec)?;
    let workloads: Vec<MeshWorkload> = lab
        .nodes()
        .iter()
        .flat_map(|n| &n.pods)
        .map(|pod| MeshWorkload::new(pod, "default", &pod.name))
        .collect();
    let dir = files_dir(name);
    // The logs apart from the configs: an agent watches its config's
    // directory, and each line it wrote there would wake it.
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    for node in lab.nodes() {
        let config = dir.join(format!("{}.yaml", node.name));
        let log = logs.join(format!("{}.log", node.name));
        let metrics = format!("metricsListen: {}:{METRICS_PORT}\n", node.ip);
        fs::write(&config, agent_config(node, &workloads) + &metrics)?;
        // Left running in the node's cgroup; `lab down` kills it with the lab.
        node.try_command(binary("warren")?)?
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting an agent")?;
    }
    print!("{}", lab.describe());
    println!(
        "\nAn agent runs on each node with every pod enrolled; configs and logs in {dir}.\n\
         Try:\n  cargo xtask lab exec n1p2 -- {labpod} serve --port 8080 --name n1p2 &\n  \
         cargo xtask lab exec n1p1 -- {labpod} call 10.244.1.3:8080\n  \
         tail {dir}/logs/node-1.log\n  \
         ip netns exec {netns} curl -s {ip}:{METRICS_PORT}/metrics\n  \
         edit {dir}/node-1.yaml (the agent reloads it)\n\
         Take it down with: cargo xtask lab down",
        dir = dir.display(),
        labpod = binary("labpod")?.display(),
        netns = lab.node(0).netns,
        ip = lab.node(0).ip,
    );
    lab.persist();
    Ok(())
}
