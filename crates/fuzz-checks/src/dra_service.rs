//! Target `dra_service`: the kubelet's `NodePrepareResources` and
//! `NodeUnprepareResources` calls after protobuf decoding, handled by the real
//! service (`grpc::dra::DraService`) over the real plugin (`plugin::VfioPlugin`),
//! its engine on the simulated kernel (the demo host) and a fake API server
//! holding a few claims. Anything that reaches the plugin's socket can send these.
//!
//! Input: calls, each an operation byte (even: prepare, odd: unprepare), a claim
//! count (at most 6) and per claim a selector byte for each of UID, namespace and
//! name: one of the stored claims' (allocated to two GPUs here, to a GPU whose
//! group it shares with a NIC, to another driver, not allocated), or free text
//! taken from the input. At the end of every input each stored claim is
//! unprepared, so every input starts from the same host.
//!
//! Properties:
//! - nothing panics, and every call answers each distinct requested UID exactly
//!   once, and no other;
//! - every error names its claim (the UID is in the text);
//! - a prepared device is in this node's pool and has CDI IDs of this driver;
//! - a call naming no stored claim (for prepare UID, namespace and name together,
//!   for unprepare the UID) changes nothing on the host: the simulated kernel
//!   records no write;
//! - unpreparing every claim succeeds and returns every GPU to its driver.

use crate::input::Input;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use serde_json::json;
use tonic::Request;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{CrashMode, Engine, EngineConfig};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot, PciFunction};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::grpc::dra::DraService;
use vfio_gpu_kubelet::grpc::v1;
use vfio_gpu_kubelet::grpc::v1::dra_plugin_server::DraPlugin;
use vfio_gpu_kubelet::plugin::{PluginConfig, device_name};

const DRIVER: &str = "vfio-gpu.dra.dev";
const NODE: &str = "demo-node";
const NS: &str = "vms";
/// The demo host's GPUs the stored claims use.
const GPUS: [&str; 3] = ["0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0"];

struct World {
    rt: tokio::runtime::Runtime,
    _api: FakeApiServer,
    service: DraService,
    kernel: SimKernel,
    root: HostRoot,
    /// The stored claims, as the kubelet would name them.
    claims: Vec<v1::Claim>,
    /// Each GPU's driver before any call.
    drivers: BTreeMap<Bdf, Option<String>>,
}

fn drivers(root: &HostRoot) -> BTreeMap<Bdf, Option<String>> {
    GPUS.iter()
        .filter_map(|g| g.parse::<Bdf>().ok())
        .map(|b| {
            let d = PciFunction::read(root, b)
                .ok()
                .and_then(|f| f.driver.map(|d| d.to_string()));
            (b, d)
        })
        .collect()
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        vfio_gpu_kubelet::serve::install_crypto_provider();
        let dir = crate::scratch::dir("dra_service");
        let _ = std::fs::remove_dir_all(&dir);
        let host = dir.join("host");
        std::fs::create_dir_all(&host).expect("host dir");
        vfio_gpu_host::demo::build_demo_host(&host).expect("demo host");
        let root = HostRoot::open(&host).expect("host root");
        let kernel = SimKernel::booted(root.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let api = rt
            .block_on(FakeApiServer::start())
            .expect("fake API server");
        let mut config = kube::Config::new(api.url().parse().expect("url"));
        config.default_retry = false;
        config.read_timeout = Some(Duration::from_secs(5));
        config.connect_timeout = Some(Duration::from_secs(5));
        let client = {
            let _guard = rt.enter();
            kube::Client::try_from(config).expect("client")
        };
        let state_dir: PathBuf = dir.join("plugins").join(DRIVER);
        let engine_config = EngineConfig {
            crash_mode: CrashMode::Return,
            unbind_lock_backoff: Duration::from_millis(1),
            state_lock_wait: Duration::from_secs(5),
            ..EngineConfig::default()
        };
        let (engine, _) = Engine::open(
            Arc::new(kernel.clone()),
            &state_dir,
            GpuSelector::default(),
            Policy::default(),
            engine_config,
        )
        .expect("engine opens");
        let mut pc = PluginConfig::new(DRIVER, NODE);
        pc.cdi_root = dir.join("cdi");
        pc.data_dir = state_dir;
        pc.api_timeout = Duration::from_secs(5);
        let plugin = {
            let _guard = rt.enter();
            vfio_gpu_kubelet::plugin::VfioPlugin::new(Arc::new(engine), client, pc)
        };
        let service = DraService::new(plugin);

        let result = |request: &str, driver: &str, gpu: &str| {
            let b: Bdf = gpu.parse().expect("demo address");
            json!({"request": request, "driver": driver, "pool": NODE, "device": device_name(&b)})
        };
        let stored = [
            (
                "two-gpus",
                Some(vec![
                    result("gpu", DRIVER, GPUS[0]),
                    result("gpu2", DRIVER, GPUS[1]),
                ]),
            ),
            ("shared-group", Some(vec![result("gpu", DRIVER, GPUS[2])])),
            (
                "other-driver",
                Some(vec![result("gpu", "gpu.nvidia.com", GPUS[1])]),
            ),
            ("unallocated", None),
        ];
        let mut claims = Vec::new();
        for (name, results) in stored {
            let requests: Vec<_> = results
                .iter()
                .flatten()
                .map(|r| json!({"name": r["request"], "exactly": {"deviceClassName": "vfio-gpu"}}))
                .collect();
            let mut object = json!({
                "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"devices": {"requests": requests}},
            });
            if let Some(results) = results {
                object["status"] =
                    json!({"allocation": {"devices": {"results": results, "config": []}}});
            }
            let stored = api.insert(object).expect("claim stored");
            claims.push(v1::Claim {
                uid: stored["metadata"]["uid"].as_str().expect("uid").to_string(),
                namespace: NS.into(),
                name: name.into(),
            });
        }
        let drivers = drivers(&root);
        World {
            rt,
            _api: api,
            service,
            kernel,
            root,
            claims,
            drivers,
        }
    })
}

/// A field of a requested claim: a stored claim's, or text from the input.
fn field(w: &World, inp: &mut Input<'_>, get: fn(&v1::Claim) -> &String) -> String {
    let sel = usize::from(inp.byte().unwrap_or(0));
    match w.claims.get(sel % 8) {
        Some(c) => get(c).clone(),
        None if sel % 8 == 7 => inp.text(80),
        None => String::new(),
    }
}

fn check_errors_and_count<T>(
    what: &str,
    asked: &[v1::Claim],
    answers: &std::collections::HashMap<String, T>,
    error: impl Fn(&T) -> &str,
) {
    let uids: HashSet<&String> = asked.iter().map(|c| &c.uid).collect();
    assert_eq!(
        answers.len(),
        uids.len(),
        "{what}: {} answers for {} distinct claims",
        answers.len(),
        uids.len()
    );
    for (uid, a) in answers {
        assert!(
            uids.contains(uid),
            "{what}: an answer for {uid:?}, never asked"
        );
        let e = error(a);
        assert!(
            e.is_empty() || e.contains(uid.as_str()),
            "{what}: error {e:?} does not name claim {uid:?}"
        );
    }
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let w = world();
    let mut inp = Input(data);
    let mut calls = 0;
    while let Some(op) = inp.byte() {
        calls += 1;
        if calls > 8 {
            break;
        }
        let n = inp.byte().unwrap_or(0) % 7;
        let claims: Vec<v1::Claim> = (0..n)
            .map(|_| v1::Claim {
                uid: field(w, &mut inp, |c| &c.uid),
                namespace: field(w, &mut inp, |c| &c.namespace),
                name: field(w, &mut inp, |c| &c.name),
            })
            .collect();
        // Prepare reads the claim by namespace and name and checks its UID;
        // unprepare goes by UID alone (the claim may be gone).
        let names_a_stored_claim = if op % 2 == 0 {
            claims.iter().any(|c| w.claims.contains(c))
        } else {
            claims
                .iter()
                .any(|c| w.claims.iter().any(|s| s.uid == c.uid))
        };
        // Counted, not copied: the log grows over a whole campaign.
        let writes_before = w.kernel.log_len();
        if op % 2 == 0 {
            let req = Request::new(v1::NodePrepareResourcesRequest {
                claims: claims.clone(),
            });
            let resp =
                w.rt.block_on(w.service.node_prepare_resources(req))
                    .expect("prepare answers")
                    .into_inner();
            check_errors_and_count("prepare", &claims, &resp.claims, |r| r.error.as_str());
            for (uid, r) in &resp.claims {
                if !r.error.is_empty() {
                    continue;
                }
                for d in &r.devices {
                    assert_eq!(d.pool_name, NODE, "claim {uid}: device of another pool");
                    assert!(
                        !d.cdi_device_ids.is_empty()
                            && d.cdi_device_ids
                                .iter()
                                .all(|id| id.starts_with(&format!("{DRIVER}/"))),
                        "claim {uid}: CDI IDs {:?}",
                        d.cdi_device_ids
                    );
                }
            }
        } else {
            let req = Request::new(v1::NodeUnprepareResourcesRequest {
                claims: claims.clone(),
            });
            let resp =
                w.rt.block_on(w.service.node_unprepare_resources(req))
                    .expect("unprepare answers")
                    .into_inner();
            check_errors_and_count("unprepare", &claims, &resp.claims, |r| r.error.as_str());
        }
        if !names_a_stored_claim {
            let written = w.kernel.log_since(writes_before);
            assert!(
                written.is_empty(),
                "a call naming no stored claim wrote to the host: {written:?}"
            );
        }
    }
    // Back to the start: every stored claim released, every GPU on its driver.
    let req = Request::new(v1::NodeUnprepareResourcesRequest {
        claims: w.claims.clone(),
    });
    let resp =
        w.rt.block_on(w.service.node_unprepare_resources(req))
            .expect("unprepare answers")
            .into_inner();
    for (uid, r) in &resp.claims {
        assert!(r.error.is_empty(), "releasing {uid} failed: {}", r.error);
    }
    assert_eq!(
        drivers(&w.root),
        w.drivers,
        "a GPU is not back on its driver after every claim was released"
    );
}
