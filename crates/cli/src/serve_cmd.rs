//! `vfio-gpu-dra serve`: run the kubelet DRA plugin on this node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use vfio_gpu_kubelet::serve::{
    CancellationToken, KubeSource, ServeOptions, serve, validate_driver_name,
};

use crate::setup::{HostOpts, TimeoutOpts, resolve_state_dir};

/// Flags of `serve`; each has an environment fallback for DaemonSet manifests.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Name of this node (normally from the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// DRA driver name (ResourceSlice spec.driver, CDI vendor).
    #[arg(
        long,
        env = "VFIO_GPU_DRA_DRIVER_NAME",
        default_value = "vfio-gpu.dra.dev"
    )]
    pub driver_name: String,
    /// Where the kubelet watches for plugin registration sockets.
    #[arg(
        long,
        env = "VFIO_GPU_DRA_KUBELET_REGISTRAR_DIR",
        default_value = "/var/lib/kubelet/plugins_registry"
    )]
    pub kubelet_registrar_dir: PathBuf,
    /// The kubelet's plugins directory; the DRA socket and plugin data go to <dir>/<driver>.
    #[arg(
        long,
        env = "VFIO_GPU_DRA_KUBELET_PLUGINS_DIR",
        default_value = "/var/lib/kubelet/plugins"
    )]
    pub kubelet_plugins_dir: PathBuf,
    /// Directory for transient CDI specs.
    #[arg(long, env = "VFIO_GPU_DRA_CDI_ROOT", default_value = "/var/run/cdi")]
    pub cdi_root: PathBuf,
    /// Engine state directory (ledger, lock), shared with the CLI's bind,
    /// release, reconcile, devices, explain and ledger; default
    /// /var/lib/vfio-gpu-dra, <demo-dir>/state with --demo.
    #[arg(long, env = "VFIO_GPU_DRA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Kubeconfig file; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds between reconciles of the host against the ledger.
    #[arg(long, default_value_t = 60)]
    pub reconcile_interval: u64,
    /// Seconds between cleanups of claims whose ResourceClaim is gone or replaced:
    /// half-prepared ones are released at once, prepared ones once no process held
    /// their vfio devices on two cleanups in a row.
    #[arg(long, default_value_t = 300)]
    pub cleanup_interval: u64,
    /// Seconds each kubelet prepare/unprepare call may take before slower claims are
    /// answered "still in progress" (kubelet retries; the kubelet's own limit is 45).
    #[arg(long, default_value_t = 40)]
    pub call_budget: u64,
    /// HOST:PORT for Prometheus /metrics and the /healthz and /readyz probes
    /// (plain HTTP); off when unset. E.g. 0.0.0.0:9464, or 127.0.0.1:9464 with
    /// hostNetwork.
    #[arg(long, env = "VFIO_GPU_DRA_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Also mount each claim's device metadata where KubeVirt 1.8.0-1.8.2 read it
    /// (/var/run/dra-device-attributes/<claim>/<request>/); KubeVirt >= 1.8.3 does
    /// not need it.
    #[arg(long, env = "VFIO_GPU_DRA_KUBEVIRT_LEGACY_METADATA")]
    pub kubevirt_legacy_metadata: bool,
    /// This pod's UID (downward API metadata.uid): enables rolling updates, a
    /// second instance on the node during a DaemonSet surge update. Sockets get
    /// per-pod names, the state lock is taken per operation instead of for the
    /// whole run, and one instance at a time publishes ResourceSlices. Needs
    /// kubelet >= 1.33. Unset: one instance per node.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// Async runtime worker threads (0: one per CPU, tokio's default). The plugin
    /// answers a few calls a minute; engine work runs on blocking threads anyway.
    #[arg(long, env = "VFIO_GPU_DRA_WORKER_THREADS", default_value_t = DEFAULT_WORKER_THREADS)]
    pub worker_threads: usize,
    /// Do not publish GPUs the admin keeps on vfio (found there, not moved by the
    /// plugin), e.g. for host VMs outside Kubernetes; by default they are offered
    /// to the vfio-gpu-prebound.dra.dev class.
    #[arg(long, env = "VFIO_GPU_DRA_HIDE_ADMIN_OWNED_GPUS")]
    pub hide_admin_owned_gpus: bool,
    /// Effect of the `<driver>/unhealthy` device taint on a GPU a VM holds
    /// when the fault makes the GPU unusable (stops answering, leaves the bus,
    /// taken off vfio): NoSchedule keeps new claims off it; NoExecute also has
    /// the device taint eviction controller (kube-controller-manager) delete the
    /// pods using it unless their claim tolerates the taint. Other unhealthy
    /// GPUs and quarantined ones are always NoSchedule.
    #[arg(
        long,
        env = "VFIO_GPU_DRA_UNHEALTHY_TAINT_EFFECT",
        default_value = "NoSchedule",
        value_name = "NoSchedule|NoExecute",
        value_parser = parse_taint_effect
    )]
    pub unhealthy_taint_effect: vfio_gpu_kubelet::slices::TaintEffect,
    /// Peer uid (SO_PEERCRED) the registration and DRA sockets serve; repeat for
    /// more. The kubelet runs as root; the plugin's own uid is always served.
    /// Others are closed unserved.
    #[arg(long = "socket-peer-uid", value_name = "UID", default_values_t = [0u32])]
    pub socket_peer_uids: Vec<u32>,
    /// Most connections each socket holds at once (a kubelet uses one or two);
    /// more are closed unserved.
    #[arg(long, default_value_t = vfio_gpu_kubelet::grpc::peers::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(usize))]
    pub socket_max_connections: usize,
    #[command(flatten)]
    pub host: HostOpts,
    #[command(flatten)]
    pub timeouts: TimeoutOpts,
}

fn parse_taint_effect(s: &str) -> Result<vfio_gpu_kubelet::slices::TaintEffect, String> {
    s.parse()
}

/// `serve`'s default runtime workers: enough for the gRPC, metrics and API
/// tasks, and a constant, where tokio's one-per-CPU would add a thread and a
/// malloc arena per CPU of a 200-CPU GPU node for an idle plugin.
pub const DEFAULT_WORKER_THREADS: usize = 2;

/// glibc malloc arenas `serve` allows unless `MALLOC_ARENA_MAX` says otherwise:
/// glibc's default (8 per CPU) lets each thread that ever allocated keep its own
/// arena's free pages resident; the plugin allocates little and seldom.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 2;

/// Caps glibc's malloc arenas before any thread starts (see [`MALLOC_ARENAS`]);
/// an admin's `MALLOC_ARENA_MAX` wins. Not glibc: nothing to do.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; called before the
        // runtime starts its threads.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) } != 1 {
            tracing::warn!("mallopt(M_ARENA_MAX) failed; glibc's default arenas apply");
        }
    }
}

/// Runs the plugin until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    // The driver name reaches the API, CDI and file names: check it before anything
    // is created.
    validate_driver_name(&args.driver_name)?;
    let setup = args.host.open()?;
    let mut opts = ServeOptions::new(
        &args.node_name,
        &args.driver_name,
        Arc::clone(&setup.kernel),
    );
    opts.selector = setup.selector.clone();
    opts.policy = setup.policy.clone();
    // The CLI's directory: one ledger, one lock, one view of the node.
    let state_dir = resolve_state_dir(args.state_dir.as_deref(), &setup);
    if args.state_dir.is_none() {
        refuse_orphaned_ledger(&args, &state_dir)?;
    }
    opts.state_dir = Some(state_dir);
    opts.plugins_dir = args.kubelet_plugins_dir.clone();
    opts.registrar_dir = args.kubelet_registrar_dir.clone();
    opts.cdi_root = args.cdi_root.clone();
    opts.kube = match &args.kubeconfig {
        Some(p) => KubeSource::Kubeconfig(p.clone()),
        None => KubeSource::InCluster,
    };
    // The host's policy re-read by every operation, and the admin's
    // deadlines (review n1, n18).
    opts.engine_config = args.timeouts.engine_config(&setup)?;
    opts.reconcile_interval = Duration::from_secs(args.reconcile_interval.max(1));
    opts.cleanup_interval = Duration::from_secs(args.cleanup_interval.max(1));
    opts.call_budget = Duration::from_secs(args.call_budget.max(1));
    opts.legacy_kubevirt_metadata = args.kubevirt_legacy_metadata;
    opts.pod_uid = args.pod_uid.clone().filter(|u| !u.is_empty());
    if args.hide_admin_owned_gpus {
        opts.admin_owned = vfio_gpu_kubelet::slices::AdminOwned::Hide;
    }
    opts.unhealthy_taint_effect = args.unhealthy_taint_effect;
    if args.socket_max_connections == 0 {
        bail!("--socket-max-connections 0 would refuse the kubelet");
    }
    opts.socket_peers = vfio_gpu_kubelet::grpc::peers::PeerPolicy {
        allowed_uids: args.socket_peer_uids.clone(),
        max_connections: args.socket_max_connections,
    };
    // Bound here so a taken port or a bad address fails before anything starts.
    if let Some(addr) = args.metrics_addr.as_deref().filter(|a| !a.is_empty()) {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the metrics endpoint --metrics-addr {addr}"))?;
        opts.metrics_listener = Some(listener);
    }

    limit_malloc_arenas();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        builder.worker_threads(args.worker_threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let token = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(token.clone()));
        let result = serve(opts, token).await;
        signals.abort();
        result
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Earlier versions kept `serve`'s ledger in `<kubelet-plugins-dir>/<driver>`.
/// Starting on the new, empty default would forget which GPUs the plugin
/// moved (they would look admin-owned and never go back): refuse instead.
fn refuse_orphaned_ledger(args: &ServeArgs, state_dir: &Path) -> Result<()> {
    let old_dir = args.kubelet_plugins_dir.join(&args.driver_name);
    let old = old_dir.join(vfio_gpu_engine::ledger::LEDGER_FILE);
    let new = state_dir.join(vfio_gpu_engine::ledger::LEDGER_FILE);
    if old_dir != state_dir && old.exists() && !new.exists() {
        bail!(
            "a ledger from an earlier version is at {}, but the state directory is now {} (shared with the CLI); \
             with the plugin stopped, move it there, or pass --state-dir {}",
            old.display(),
            state_dir.display(),
            old_dir.display()
        );
    }
    Ok(())
}

async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; stopping");
            token.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use vfio_gpu_kubelet::slices::TaintEffect;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["serve", "--node-name", "n"];
        argv.extend_from_slice(extra);
        Serve::try_parse_from(argv).map(|s| s.args)
    }

    /// NoSchedule unless the admin asks for eviction; anything but the API's
    /// two spellings is refused before serve starts.
    #[test]
    fn the_unhealthy_taint_effect_defaults_to_no_schedule_and_takes_only_the_api_spellings() {
        let default = parse(&[]).expect("defaults parse");
        assert_eq!(default.unhealthy_taint_effect, TaintEffect::NoSchedule);
        let evict = parse(&["--unhealthy-taint-effect", "NoExecute"]).expect("NoExecute");
        assert_eq!(evict.unhealthy_taint_effect, TaintEffect::NoExecute);
        for bad in ["noexecute", "None", "PreferNoSchedule"] {
            assert!(
                parse(&["--unhealthy-taint-effect", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }
}
