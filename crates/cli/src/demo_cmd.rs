//! `vfio-gpu-dra demo`: the whole plugin lifecycle on the built-in demo host,
//! with nothing installed: the real plugin (real Unix sockets, real gRPC, the
//! real kube-rs client) against an in-process API server, driven by a kubelet
//! emulator. Step by step, for a person to read.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use vfio_gpu_engine::kernel::{Kernel, SysfsKernel};
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Inspection, inspect, source_name};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot, IdMatch, PciFunction};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::grpc::dra::ClaimRef;
use vfio_gpu_kubelet::grpc::emulator::{KubeletEmulator, RegisteredPlugin};
use vfio_gpu_kubelet::plugin::device_name;
use vfio_gpu_kubelet::serve::{CancellationToken, KubeSource, ServeOptions, serve};

const DRIVER: &str = "vfio-gpu.dra.dev";
const NODE: &str = "demo-node";
const NAMESPACE: &str = "vms";
/// Every step is bounded: the demo never hangs.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags of `demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where to build the demo node (host tree, sockets, CDI specs, ledger);
    /// default: a fresh temporary directory, removed afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run against this host root with the real sysfs kernel instead of the
    /// demo host (the real-kernel test uses it; needs root and an IOMMU).
    #[arg(long)]
    pub host_root: Option<PathBuf>,
    /// With --host-root: select GPUs by vendor:device (repeatable).
    #[arg(long = "gpu-id", value_name = "VVVV:DDDD")]
    pub gpu_ids: Vec<String>,
    /// The GPUs the claim asks for (default on the demo host: 0000:ab:00.0 and 0000:18:00.0).
    #[arg(long = "claim", value_name = "BDF")]
    pub claim: Vec<String>,
    /// The claim's opaque `VfioDeviceConfig` `iommuBackend`: `legacy`
    /// (`/dev/vfio/<group>`) or `iommufd` (`/dev/iommu` + `/dev/vfio/devices/vfioN`);
    /// default: no config (the driver's default, legacy).
    #[arg(long, value_name = "BACKEND", value_parser = ["legacy", "iommufd"])]
    pub iommu_backend: Option<String>,
    /// Test hook: delete the ResourceClaim from the API server right after the
    /// prepare, as a force-deleted pod does; the kubelet still unprepares it.
    #[arg(long, hide = true)]
    pub delete_claim_after_prepare: bool,
    /// Test hook: `sh -c` this after the prepare (and the deletion), before the
    /// unprepare, with the plugin still serving; a failure stops the demo.
    #[arg(long, hide = true, value_name = "SHELL COMMAND")]
    pub between_prepare_and_unprepare: Option<String>,
    /// Seconds between the plugin's cleanups of stale claims (serve's --cleanup-interval).
    #[arg(long, hide = true, default_value_t = 300)]
    pub cleanup_interval: u64,
    /// Seconds between the plugin's periodic reconciles (serve's --reconcile-interval).
    #[arg(long, hide = true, default_value_t = 60)]
    pub reconcile_interval: u64,
    /// The HGX demo host: 8 × H100 SXM with NVSwitches and a simulated Fabric
    /// Manager; the claim asks for two GPUs tied by
    /// `matchAttribute: vfio-gpu.dra.dev/partition2`, and its NVLink partition
    /// is activated at prepare and deactivated at unprepare.
    #[arg(long, conflicts_with = "host_root")]
    pub hgx: bool,
}

/// The between-prepare-and-unprepare hook may sleep through several cleanup intervals.
const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

fn step(n: u32, title: &str) {
    println!("\n━━ {n}. {title}");
}

fn bdf(s: &str) -> Result<Bdf> {
    Ok(s.parse()?)
}

fn driver_of(host: &Path, b: &str) -> Result<String> {
    let root = HostRoot::open(host)?;
    Ok(PciFunction::read(&root, bdf(b)?)?
        .driver
        .map(|d| d.to_string())
        .unwrap_or_else(|| "no driver".into()))
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("{what}: no answer within {} s", STEP_TIMEOUT.as_secs()))?
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            // Short path: Unix socket paths are limited to 108 bytes.
            temp = tempfile::Builder::new()
                .prefix("vfio-gpu-dra-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(demo(&dir, &args))?;
    Ok(ExitCode::SUCCESS)
}

/// What every step works on: the demo node and the plugin's paths.
struct Node {
    /// The host tree (the demo host, or `--host-root`).
    host: PathBuf,
    root: HostRoot,
    kernel: Arc<dyn Kernel>,
    selector: GpuSelector,
    /// The plugin's ledger: without it the verdicts call the plugin's own
    /// driver_override and binding someone else's.
    state_dir: PathBuf,
    /// Where the plugin writes CDI specs.
    cdi: PathBuf,
    /// The GPUs the claim asks for.
    claimed: Vec<String>,
    /// The simulated Fabric Manager's state file (the HGX demo).
    fm_file: Option<PathBuf>,
}

impl Node {
    /// The GPUs and verdicts as `devices` shows them, with the plugin's ledger.
    fn inspect(&self) -> Result<Inspection> {
        Ok(inspect(
            &self.root,
            &self.selector,
            &Policy::default(),
            Some(&self.state_dir),
        )?)
    }
}

/// The running plugin: how to stop it and the socket the kubelet dials.
struct Plugin {
    token: CancellationToken,
    server: tokio::task::JoinHandle<Result<()>>,
    reg_socket: PathBuf,
}

/// The main job, one function per printed step.
async fn demo(dir: &Path, args: &DemoArgs) -> Result<()> {
    let node = the_node(dir, args)?;
    let (api, kubeconfig) = start_api_server(dir).await?;
    let plugin = start_plugin(dir, &node, args, kubeconfig).await?;
    let kubelet = register(&plugin.reg_socket).await?;
    show_resource_slice(&api, args).await?;
    let claim = allocate_claim(&api, &node, args)?;
    prepare(&kubelet, &claim, &node).await?;
    print_fabric(&node)?;
    show_cdi_specs(&node.cdi)?;
    run_test_hooks(&api, args).await?;
    unprepare(&kubelet, &claim).await?;
    where_each_gpu_went(&node)?;
    print_fabric(&node)?;
    stop(plugin, api).await
}

/// Step 1: the demo host with a simulated kernel, or `--host-root` with real sysfs.
fn the_node(dir: &Path, args: &DemoArgs) -> Result<Node> {
    let (host, kernel, selector): (PathBuf, Arc<dyn Kernel>, GpuSelector) = match &args.host_root {
        Some(real) => {
            step(1, "The node: this host, real sysfs");
            let root = HostRoot::open(real)?;
            let rules = args
                .gpu_ids
                .iter()
                .map(|id| IdMatch::parse_id(id))
                .collect::<Result<Vec<_>, _>>()?;
            let selector = if rules.is_empty() {
                GpuSelector::default()
            } else {
                GpuSelector::from_rules(rules)
            };
            println!("host root {}", real.display());
            (real.clone(), Arc::new(SysfsKernel::new(root)), selector)
        }
        None => {
            let host = dir.join("host");
            if host.exists() {
                std::fs::remove_dir_all(&host)
                    .with_context(|| format!("clearing {}", host.display()))?;
            }
            std::fs::create_dir_all(&host)?;
            if args.hgx {
                step(
                    1,
                    "The node: an HGX H100 board with a simulated kernel and Fabric Manager",
                );
                vfio_gpu_host::demo::build_hgx_demo_host(&host)
                    .context("building the HGX demo host")?;
                println!("{}", vfio_gpu_host::demo::HGX_DESCRIPTION);
            } else {
                step(1, "The node: an 8-GPU server with a simulated kernel");
                vfio_gpu_host::demo::build_demo_host(&host).context("building the demo host")?;
                println!("{}", vfio_gpu_host::demo::DEMO_DESCRIPTION);
            }
            let root = HostRoot::open(&host)?;
            (
                host,
                Arc::new(SimKernel::booted(root)),
                GpuSelector::default(),
            )
        }
    };
    let claimed: Vec<String> = if args.claim.is_empty() && args.hgx {
        // Modules 1 and 3: H100 partition 3, not adjacent in PCI order.
        vec!["0000:9a:00.0".into(), "0000:ab:00.0".into()]
    } else if args.claim.is_empty() {
        vec!["0000:ab:00.0".into(), "0000:18:00.0".into()]
    } else {
        args.claim.clone()
    };
    Ok(Node {
        root: HostRoot::open(&host)?,
        host,
        kernel,
        selector,
        state_dir: dir.join("state"),
        cdi: dir.join("cdi"),
        claimed,
        fm_file: args.hgx.then(|| dir.join("fabric-manager.json")),
    })
}

/// Step 2: the in-process API server with the Node and the DeviceClass; its kubeconfig.
async fn start_api_server(dir: &Path) -> Result<(FakeApiServer, PathBuf)> {
    step(
        2,
        "A Kubernetes API server (in-process, plain HTTP on loopback)",
    );
    vfio_gpu_kubelet::serve::install_crypto_provider();
    let api = FakeApiServer::start().await?;
    api.insert(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))?;
    let class: Value = serde_json::from_str(DEVICE_CLASS)?;
    api.insert(class)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    println!(
        "API server at {}; Node {NODE} and DeviceClass {DRIVER} created",
        api.url()
    );
    Ok((api, kubeconfig))
}

/// Step 3: `serve` in a task, until its registration socket accepts.
async fn start_plugin(
    dir: &Path,
    node: &Node,
    args: &DemoArgs,
    kubeconfig: PathBuf,
) -> Result<Plugin> {
    step(
        3,
        "Start the plugin: `vfio-gpu-dra serve` (reconcile, then the sockets)",
    );
    let mut opts = ServeOptions::new(NODE, DRIVER, node.kernel.clone());
    opts.selector = node.selector.clone();
    opts.state_dir = Some(node.state_dir.clone());
    opts.plugins_dir = dir.join("plugins");
    opts.registrar_dir = dir.join("plugins_registry");
    opts.cdi_root = node.cdi.clone();
    opts.kube = KubeSource::Kubeconfig(kubeconfig);
    opts.cleanup_interval = Duration::from_secs(args.cleanup_interval.max(1));
    opts.reconcile_interval = Duration::from_secs(args.reconcile_interval.max(1));
    // The crash tests kill the plugin mid-prepare the same way they kill `bind`.
    opts.engine_config.crash_after_step = crate::setup::crash_hook()?;
    if let Some(fm_file) = &node.fm_file {
        // A leftover from an earlier demo, or none: the fabric starts afresh either way.
        let _ = std::fs::remove_file(fm_file);
        opts.engine_config.fabric = Some(crate::fabric_cmd::demo_config(
            dir,
            &node.host,
            &crate::fabric_cmd::FabricOpts::default(),
        )?);
    }
    let token = CancellationToken::new();
    let mut server = tokio::spawn(serve(opts, token.clone()));
    let reg_socket = dir
        .join("plugins_registry")
        .join(format!("{DRIVER}-reg.sock"));
    let waited = within("registration socket", async {
        // The file appears at bind(), before listen(): wait until it accepts.
        while std::os::unix::net::UnixStream::connect(&reg_socket).is_err() {
            if server.is_finished() {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(true)
    })
    .await?;
    if !waited {
        let why = match (&mut server).await {
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(())) => "it returned without an error".into(),
            Err(e) => format!("its task failed: {e}"),
        };
        bail!("the plugin stopped before it opened its sockets: {why}");
    }
    println!("registration socket {}", reg_socket.display());
    Ok(Plugin {
        token,
        server,
        reg_socket,
    })
}

/// Step 4: the kubelet emulator registers the plugin.
async fn register(reg_socket: &Path) -> Result<RegisteredPlugin> {
    step(
        4,
        "kubelet: register the plugin (kubelet-style percent-encoded :authority)",
    );
    let kubelet = within("registration", async {
        Ok(KubeletEmulator::new(reg_socket).register().await?)
    })
    .await?;
    println!(
        "GetInfo: type {}, name {}, endpoint {}, versions {:?} → kubelet uses {}",
        kubelet.info.r#type,
        kubelet.info.name,
        kubelet.info.endpoint,
        kubelet.info.supported_versions,
        kubelet.version.as_str()
    );
    Ok(kubelet)
}

/// Step 5: the node's ResourceSlice, one line per device.
async fn show_resource_slice(api: &FakeApiServer, args: &DemoArgs) -> Result<()> {
    step(5, "ResourceSlice published for the node");
    let slice = within("ResourceSlice", async {
        loop {
            if let Some(s) = api.list("resourceslices", None).into_iter().next() {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    println!(
        "{} (pool {}, generation {})",
        slice["metadata"]["name"].as_str().unwrap_or("?"),
        slice["spec"]["pool"]["name"].as_str().unwrap_or("?"),
        slice["spec"]["pool"]["generation"]
    );
    let empty = Vec::new();
    for d in slice["spec"]["devices"].as_array().unwrap_or(&empty) {
        let attr = |k: &str| {
            let a = &d["attributes"][k];
            a.get("string")
                .or_else(|| a.get("bool"))
                .or_else(|| a.get("int"))
                .map(|v| v.to_string().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        println!(
            "  {:<18} {}  {:<24} driver {:<9} keepOnVfio {}",
            d["name"].as_str().unwrap_or("?"),
            attr("resource.kubernetes.io/pciBusID"),
            attr("productName").chars().take(24).collect::<String>(),
            attr("driver"),
            attr("keepOnVfio")
        );
        if args.hgx {
            println!(
                "  {:<18} gpuModuleID {} partition1 {} partition2 {} partition4 {} partition8 {} nvlinkFabric {} fabricManaged {}",
                "",
                attr("gpuModuleID"),
                attr("partition1"),
                attr("partition2"),
                attr("partition4"),
                attr("partition8"),
                attr("nvlinkFabric"),
                attr("fabricManaged")
            );
        }
    }
    if args.hgx {
        println!("  (the 4 NVSwitches, class 0x0680, are never offered)");
    } else if args.host_root.is_none() {
        println!("  (0000:db:00.0 is not offered: a NIC shares its IOMMU group)");
    }
    Ok(())
}

/// Step 6: the scheduler's allocation, as a ResourceClaim with its status.
fn allocate_claim(api: &FakeApiServer, node: &Node, args: &DemoArgs) -> Result<ClaimRef> {
    step(6, "Scheduler: allocate a claim");
    let mut requests = Vec::new();
    let mut results = Vec::new();
    for (i, b) in node.claimed.iter().enumerate() {
        let request = if i == 0 {
            "gpu".to_string()
        } else {
            format!("gpu{}", i + 1)
        };
        requests.push(json!({"name": request, "exactly": {"deviceClassName": DRIVER}}));
        results.push(json!({"request": request, "driver": DRIVER, "pool": NODE,
                            "device": device_name(&bdf(b)?)}));
    }
    // The opaque config as the scheduler copies it into the allocation (the
    // copy the plugin reads).
    let config: Vec<Value> = args
        .iommu_backend
        .iter()
        .map(|b| {
            json!({"source": "FromClaim", "requests": [],
                   "opaque": {"driver": DRIVER, "parameters": {
                       "apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig",
                       "iommuBackend": b}}})
        })
        .collect();
    // The HGX claim ties its requests to one partition of its size, as the
    // scheduler's allocator enforces (deploy/fabric/kubevirt-vm-nvlink.yaml).
    let constraints: Vec<Value> = if args.hgx {
        let names: Vec<Value> = requests.iter().map(|r| r["name"].clone()).collect();
        println!(
            "  constraint: matchAttribute {DRIVER}/partition{} over {} requests",
            node.claimed.len(),
            requests.len()
        );
        vec![json!({"requests": names,
                    "matchAttribute": format!("{DRIVER}/partition{}", node.claimed.len())})]
    } else {
        Vec::new()
    };
    let stored = api.insert(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "vm-gpus", "namespace": NAMESPACE},
        "spec": {"devices": {"requests": requests, "constraints": constraints}},
        "status": {"allocation": {"devices": {"results": results, "config": config}}}
    }))?;
    if let Some(b) = &args.iommu_backend {
        println!("  opaque VfioDeviceConfig: iommuBackend {b}");
    }
    let claim = ClaimRef {
        uid: stored["metadata"]["uid"]
            .as_str()
            .ok_or_else(|| anyhow!("claim has no uid"))?
            .to_string(),
        namespace: NAMESPACE.into(),
        name: "vm-gpus".into(),
    };
    println!("ResourceClaim {NAMESPACE}/vm-gpus (uid {})", claim.uid);
    for b in &node.claimed {
        println!("  {b} (now on {})", driver_of(&node.host, b)?);
    }
    Ok(claim)
}

/// Step 7: NodePrepareResources, the CDI ids it answers and where each function went.
async fn prepare(kubelet: &RegisteredPlugin, claim: &ClaimRef, node: &Node) -> Result<()> {
    step(7, "kubelet: NodePrepareResources");
    let prepared = within("NodePrepareResources", async {
        Ok(kubelet.prepare(std::slice::from_ref(claim)).await?)
    })
    .await?;
    let devices = prepared
        .get(&claim.uid)
        .ok_or_else(|| anyhow!("no answer for the claim"))?
        .clone()
        .map_err(|e| anyhow!("prepare failed: {e}"))?;
    for d in &devices {
        println!(
            "  {} {} → CDI {}",
            d.request_names.join(","),
            d.device_name,
            d.cdi_device_ids.join(", ")
        );
    }
    let view = node.inspect()?;
    for g in view
        .gpus
        .iter()
        .filter(|g| node.claimed.contains(&g.gpu.bdf().to_string()))
    {
        for f in &g.gpu.functions {
            println!(
                "  host: {} is on {}",
                f.bdf,
                driver_of(&node.host, &f.bdf.to_string())?
            );
        }
    }
    Ok(())
}

/// Step 8: every CDI spec the plugin wrote (the metadata spec named only).
fn show_cdi_specs(cdi: &Path) -> Result<()> {
    step(
        8,
        "The CDI spec the container runtime (and KubeVirt) will use",
    );
    let mut specs: Vec<PathBuf> = std::fs::read_dir(cdi)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    specs.sort();
    for spec in &specs {
        let name = spec
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.contains("_metadata_") {
            println!("{name}: bind-mounts the KEP-5304 device metadata KubeVirt reads");
            continue;
        }
        let text = std::fs::read_to_string(spec)?;
        let pretty = serde_json::to_string_pretty(&serde_json::from_str::<Value>(&text)?)?;
        println!("{name}:\n{pretty}");
    }
    Ok(())
}

/// The hidden test hooks between prepare and unprepare: delete the claim, run a command.
async fn run_test_hooks(api: &FakeApiServer, args: &DemoArgs) -> Result<()> {
    if args.delete_claim_after_prepare {
        println!("\n━━ test hook: the ResourceClaim is deleted while prepared (pod force-deleted)");
        api.delete("resourceclaims", Some(NAMESPACE), "vm-gpus")
            .ok_or_else(|| {
                anyhow!("ResourceClaim {NAMESPACE}/vm-gpus was not in the API server")
            })?;
        // A finalizer would only mark it: the test needs it really gone.
        if api
            .get("resourceclaims", Some(NAMESPACE), "vm-gpus")
            .is_some()
        {
            bail!("ResourceClaim {NAMESPACE}/vm-gpus is still in the API server after the delete");
        }
        println!(
            "ResourceClaim {NAMESPACE}/vm-gpus deleted; plugin cleanup every {} s, reconcile every {} s",
            args.cleanup_interval.max(1),
            args.reconcile_interval.max(1)
        );
    }
    if let Some(cmd) = &args.between_prepare_and_unprepare {
        println!("\n━━ test hook: `sh -c {cmd:?}` while the claim is prepared");
        run_hook(cmd).await?;
    }
    Ok(())
}

/// Step 9: NodeUnprepareResources.
async fn unprepare(kubelet: &RegisteredPlugin, claim: &ClaimRef) -> Result<()> {
    step(9, "kubelet: NodeUnprepareResources (the VM is gone)");
    let unprepared = within("NodeUnprepareResources", async {
        Ok(kubelet.unprepare(std::slice::from_ref(claim)).await?)
    })
    .await?;
    match unprepared.get(&claim.uid) {
        Some(Ok(())) => println!("  unprepared"),
        Some(Err(e)) => bail!("unprepare failed: {e}"),
        None => bail!("no answer for the claim"),
    }
    Ok(())
}

/// Step 10: each claimed GPU's functions, why it stays on vfio-pci or that it
/// went back, and the CDI specs left.
fn where_each_gpu_went(node: &Node) -> Result<()> {
    step(10, "Where each GPU went, and why");
    let view = node.inspect()?;
    for b in &node.claimed {
        let g = view
            .gpus
            .iter()
            .find(|g| &g.gpu.bdf().to_string() == b)
            .ok_or_else(|| anyhow!("{b} not found"))?;
        let funcs: Vec<String> = g
            .gpu
            .functions
            .iter()
            .map(|f| {
                format!(
                    "{} on {}",
                    f.bdf,
                    f.driver.as_ref().map(|d| d.as_str()).unwrap_or("no driver")
                )
            })
            .collect();
        println!("  {}", funcs.join(", "));
        if g.verdict.keep_on_vfio {
            for r in &g.verdict.reasons {
                println!(
                    "    stays on vfio-pci: {}: {}",
                    source_name(r.source),
                    r.detail
                );
            }
        } else {
            println!(
                "    returned to the drivers it came from (recorded in the ledger before the move)"
            );
        }
    }
    let left = std::fs::read_dir(&node.cdi)?.count();
    println!("  CDI specs left: {left}");
    Ok(())
}

/// Stops the plugin (it removes its sockets) and the API server.
async fn stop(plugin: Plugin, api: FakeApiServer) -> Result<()> {
    plugin.token.cancel();
    within("shutdown", async {
        plugin.server.await.context("plugin task")??;
        Ok(())
    })
    .await?;
    println!(
        "\nPlugin stopped; sockets removed: {}",
        !plugin.reg_socket.exists()
    );
    api.shutdown().await;
    Ok(())
}

/// Runs a test hook with the plugin still serving (the runtime keeps going).
async fn run_hook(cmd: &str) -> Result<()> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(true)
        .spawn()
        .context("starting the test hook")?;
    let status = tokio::time::timeout(HOOK_TIMEOUT, child.wait())
        .await
        .map_err(|_| anyhow!("test hook: not done within {} s", HOOK_TIMEOUT.as_secs()))?
        .context("waiting for the test hook")?;
    if !status.success() {
        bail!("test hook failed: {status}");
    }
    println!("test hook done");
    Ok(())
}

const DEVICE_CLASS: &str = r#"{
  "apiVersion": "resource.k8s.io/v1",
  "kind": "DeviceClass",
  "metadata": {"name": "vfio-gpu.dra.dev"},
  "spec": {"selectors": [{"cel": {"expression": "device.driver == \"vfio-gpu.dra.dev\""}}]}
}"#;

/// The node as `devices` shows it once the plugin has written the `active`
/// mark of the claim's partition, which it does right after answering the
/// kubelet (a few milliseconds; at most 5 s are waited).
fn settled_view(node: &Node) -> Result<Inspection> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let view = node.inspect()?;
        let activating = view.gpus.iter().any(|g| {
            g.fabric
                .as_ref()
                .and_then(|f| f.partition.as_ref())
                .is_some_and(|(_, state, _)| {
                    *state == vfio_gpu_engine::fabric_state::PartitionState::Activating
                })
        });
        if !activating || std::time::Instant::now() >= deadline {
            return Ok(view);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The HGX demo: FM's active partitions and the claimed GPUs' module and
/// partition (nothing on the other demo hosts).
fn print_fabric(node: &Node) -> Result<()> {
    let Some(fm_file) = &node.fm_file else {
        return Ok(());
    };
    let claimed = &node.claimed;
    let state: vfio_gpu_fabric::SimState = serde_json::from_slice(
        &std::fs::read(fm_file).with_context(|| format!("reading {}", fm_file.display()))?,
    )?;
    let active: Vec<String> = state.active.iter().map(ToString::to_string).collect();
    println!(
        "  Fabric Manager: active partitions [{}]; calls: {}",
        active.join(", "),
        state
            .log
            .iter()
            .filter(|l| !matches!(
                l.call,
                vfio_gpu_fabric::Call::Connect | vfio_gpu_fabric::Call::GetSupportedPartitions
            ))
            .map(|l| format!(
                "{}({:?})={}",
                l.call,
                l.partitions.iter().map(|p| p.0).collect::<Vec<_>>(),
                l.code
            ))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let view = settled_view(node)?;
    for g in view
        .gpus
        .iter()
        .filter(|g| claimed.contains(&g.gpu.bdf().to_string()))
    {
        let Some(f) = &g.fabric else { continue };
        let part = match &f.partition {
            Some((id, st, h)) => format!(
                "ledger: partition {id} {st:?} for {}",
                h.as_ref()
                    .map_or_else(|| "nobody".to_string(), ToString::to_string)
            ),
            None => "ledger: no partition".to_string(),
        };
        println!(
            "  {} module {}: {part}",
            g.gpu.bdf(),
            f.module_id
                .map_or_else(|| "?".to_string(), |m| m.to_string())
        );
    }
    Ok(())
}
