//! Tables for people, JSON for programs.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;
use vfio_gpu_engine::ledger::LedgerBody;
use vfio_gpu_engine::{EngineError, GpuView, Inspection, Outcome, pin_text, source_name};
use vfio_gpu_host::{Bdf, FunctionRole};
use vfio_gpu_node::mmio::{MmioWindow, human_bytes};

use crate::Output;
use crate::setup::Setup;

/// `s` cut to `width` characters, the last one `…` when cut.
pub(crate) fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn short_product(name: Option<&str>) -> String {
    // "GH100 [H100 SXM5 80GB]" reads best as the bracketed marketing name.
    let n = name.unwrap_or("");
    match (n.find('['), n.rfind(']')) {
        (Some(a), Some(b)) if b > a => n[a + 1..b].to_string(),
        _ => n.to_string(),
    }
}

/// The JSON object for one GPU (the documented keys first).
fn gpu_json(v: &GpuView) -> serde_json::Value {
    let f = &v.gpu.function;
    json!({
        "pciBusID": f.bdf,
        "vendorID": format!("0x{:04x}", f.identity.vendor),
        "deviceID": format!("0x{:04x}", f.identity.device),
        "subsystemVendorID": format!("0x{:04x}", f.identity.subsystem_vendor),
        "subsystemDeviceID": format!("0x{:04x}", f.identity.subsystem_device),
        "class": format!("0x{:06x}", f.identity.class),
        "revision": format!("0x{:02x}", f.revision),
        "productName": v.gpu.product_name,
        "driver": f.driver.as_ref().map(|d| d.as_str()),
        "driverOverride": f.driver_override,
        "iommuGroup": f.iommu_group,
        "iommuGroupMembers": v.gpu.iommu_group_members,
        "functions": v.gpu.functions,
        "numaNode": f.numa_node,
        "pcieRoot": f.pcie_root,
        "sriovTotalVFs": f.sriov_total_vfs,
        "sriovNumVFs": f.sriov_num_vfs,
        "vfioDevice": f.vfio_dev,
        "barBytes": f.bar_bytes,
        "keepOnVfio": v.verdict.keep_on_vfio,
        "reasons": v.verdict.reasons,
        "pinned": v.verdict.pinned.as_ref().map(pin_text),
        "warnings": v.verdict.warnings,
        "record": v.record,
    })
}

/// `devices`.
pub fn devices(view: &Inspection, output: Output, setup: &Setup) -> Result<()> {
    if output == Output::Json {
        let arr: Vec<_> = view.gpus.iter().map(gpu_json).collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
        return Ok(());
    }
    if setup.hgx_demo.is_some() {
        println!("{}\n", vfio_gpu_host::demo::HGX_DESCRIPTION);
    } else if setup.demo {
        println!("{}\n", vfio_gpu_host::demo::DEMO_DESCRIPTION);
    }
    println!(
        "{:<12} {:<9} {:<16} {:<9} {:>3} {:>2} KEEP ON VFIO",
        "GPU", "ID", "PRODUCT", "DRIVER", "GRP", "NU"
    );
    for v in &view.gpus {
        let f = &v.gpu.function;
        let keep = if let Some(p) = &v.verdict.pinned {
            format!("pinned: {}", cut(&pin_text(p), 12))
        } else if v.verdict.keep_on_vfio {
            let mut sources: Vec<String> = v
                .verdict
                .reasons
                .iter()
                .map(|r| source_name(r.source))
                .collect();
            sources.dedup();
            match sources.len() {
                0 | 1 => format!("yes: {}", sources.join("")),
                n => format!("yes: {} +{}", sources[0], n - 1),
            }
        } else {
            "no".to_string()
        };
        println!(
            "{:<12} {:<9} {:<16} {:<9} {:>3} {:>2} {}",
            f.bdf,
            f.identity.vendor_device(),
            cut(&short_product(v.gpu.product_name.as_deref()), 16),
            cut(f.driver.as_ref().map(|d| d.as_str()).unwrap_or("-"), 9),
            f.iommu_group.map(|g| g.to_string()).unwrap_or("-".into()),
            f.numa_node.map(|g| g.to_string()).unwrap_or("-".into()),
            cut(&keep, 24),
        );
        for m in &v.gpu.iommu_group_members {
            if m.role == FunctionRole::Gpu {
                continue;
            }
            let role = match m.role {
                FunctionRole::Companion => "moves with GPU",
                FunctionRole::Bridge => "bridge, stays",
                FunctionRole::OtherGpu => "another GPU!",
                FunctionRole::Foreign => "foreign: blocks",
                FunctionRole::NvSwitch => "NVSwitch or NVLink management: blocks",
                FunctionRole::Gpu => "",
            };
            println!(
                "  + {:<12} {:<9} {:<17} {}",
                m.bdf,
                m.identity.vendor_device(),
                cut(m.driver.as_ref().map(|d| d.as_str()).unwrap_or("-"), 17),
                role
            );
        }
        if let Some(r) = &v.record {
            let holder = r
                .holder
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_else(|| "nobody".into());
            println!("  ledger: {:?}, held by {}", r.state, cut(&holder, 40));
        }
    }
    if view.gpus.is_empty() {
        println!("(no GPUs selected on {})", setup.describe_root());
    }
    for p in &view.problems {
        eprintln!("warning: {p}");
    }
    if let Some(p) = &view.ledger_problem {
        eprintln!("warning: ledger unreadable: {p}");
    }
    Ok(())
}

/// `explain` as JSON: the GPU, its signals and everything said about it.
pub fn explain_json(v: &GpuView, other: Option<&OtherDriver>) -> Result<serde_json::Value> {
    let mut obj = gpu_json(v);
    obj["signals"] = serde_json::to_value(&v.verdict.signals)?;
    if let Some(o) = other {
        obj["publishedByOtherDriver"] = serde_json::to_value(o)?;
    }
    if let Some(p) = &v.persistence_left_off {
        obj["persistenceLeftOff"] = serde_json::to_value(p)?;
    }
    if let Some(q) = &v.quarantine {
        obj["quarantine"] = serde_json::to_value(q)?;
    }
    if let Some(h) = &v.last_handover {
        obj["lastHandover"] = serde_json::to_value(h)?;
    }
    obj["guestMmio"] = mmio_json(&[f_bar64(v)]);
    Ok(obj)
}

/// The guest MMIO window for GPUs with these 64-bit prefetchable BAR totals.
pub fn mmio_json(per_gpu: &[u64]) -> serde_json::Value {
    let w = MmioWindow::for_gpus(per_gpu);
    json!({
        "barPrefetchable64Bytes": w.bar_bytes,
        "windowBytes": w.window_bytes,
        "ovmfPciMmio64Mb": w.ovmf_mib,
        "guidance": w.guidance(),
    })
}

/// The line `explain` ends with when it explains several GPUs: the window a
/// VM given all of them (one claim's GPUs) needs.
pub fn mmio_for_claim(per_gpu: &[u64]) {
    let w = MmioWindow::for_gpus(per_gpu);
    println!(
        "
A VM given these {} GPUs: {}.",
        per_gpu.len(),
        w.guidance()
    );
}

/// `explain`.
pub fn explain(
    v: &GpuView,
    other: Option<&OtherDriver>,
    output: Output,
    _setup: &Setup,
) -> Result<()> {
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&explain_json(v, other)?)?
        );
        return Ok(());
    }
    let f = &v.gpu.function;
    println!(
        "{} {} {}",
        f.bdf,
        f.identity.vendor_device(),
        v.gpu.product_name.as_deref().unwrap_or("")
    );
    println!(
        "  subsystem {:04x}:{:04x}, class 0x{:06x}, driver {}, driver_override {}",
        f.identity.subsystem_vendor,
        f.identity.subsystem_device,
        f.identity.class,
        f.driver.as_ref().map(|d| d.as_str()).unwrap_or("none"),
        f.driver_override.as_deref().unwrap_or("(null)")
    );
    let fns: Vec<String> = v.gpu.functions.iter().map(|x| x.bdf.to_string()).collect();
    println!(
        "  IOMMU group {}, functions that move together: {}",
        f.iommu_group
            .map(|g| g.to_string())
            .unwrap_or("none".into()),
        fns.join(", ")
    );
    if let Some(fab) = &v.fabric {
        println!("  {}", fabric_line(fab));
    }
    println!(
        "  64-bit prefetchable BARs {}: {}",
        human_bytes(f_bar64(v)),
        MmioWindow::for_gpus(&[f_bar64(v)]).guidance()
    );
    println!("\nSignals considered:");
    for s in &v.verdict.signals {
        println!(
            "  [{}] {:<15} {}",
            if s.matched { "x" } else { " " },
            source_name(s.source),
            s.detail
        );
    }
    println!();
    if let Some(p) = &v.verdict.pinned {
        println!(
            "Pinned: {}. vfio-gpu-dra never moves this GPU.",
            pin_text(p)
        );
    }
    if v.verdict.keep_on_vfio {
        println!(
            "Verdict: keepOnVfio = true. When a claim releases this GPU it stays on vfio-pci, because:"
        );
        for r in &v.verdict.reasons {
            println!("  - {}: {}", source_name(r.source), r.detail);
        }
    } else {
        println!(
            "Verdict: keepOnVfio = false. When a claim releases this GPU it goes back to the driver it came from."
        );
    }
    for w in &v.verdict.warnings {
        println!("warning: {w}");
    }
    if let Some(o) = other {
        println!(
            "Not offered: driver {} publishes this GPU on this node too (serve's slice sync at {}, Unix time), \
             so vfio-gpu-dra leaves it out of its ResourceSlices; give each GPU one driver (docs/operating.md).",
            o.driver, o.observed_at_unix
        );
    }
    if let Some(p) = &v.persistence_left_off {
        println!(
            "warning: nvidia persistence mode was left off at a release ({}); reconcile retries `nvidia-smi -pm 1`",
            p.error
        );
    }
    if let Some(q) = &v.quarantine {
        println!(
            "QUARANTINED since {} (epoch s), {}: {}. Offered to nobody: published with the device taint \
             <driver>/quarantined={}:NoSchedule where the API server keeps device taints (Kubernetes 1.37+, \
             or DRADeviceTaints on), otherwise left out of the ResourceSlice; `vfio-gpu-dra reset {}` resets, \
             verifies and clears it.",
            q.since,
            q.cause.as_str(),
            q.reason,
            q.cause.as_str(),
            f.bdf
        );
    }
    if let Some(h) = &v.last_handover {
        println!("Last hand-over: {}", handover_line(h));
    }
    if let Some(r) = &v.record {
        println!("\nLedger: {}", serde_json::to_string(r)?);
    }
    Ok(())
}

/// A GPU's 64-bit prefetchable BAR total.
fn f_bar64(v: &GpuView) -> u64 {
    v.gpu.function.bar_prefetchable64_bytes
}

/// Another driver publishing the GPU `explain` shows, from serve's record.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OtherDriver {
    /// That driver's name.
    pub driver: String,
    /// When serve's slice sync saw it, in seconds since the Unix epoch.
    pub observed_at_unix: u64,
}

/// One tenant hand-over, in words.
fn handover_line(h: &vfio_gpu_engine::ledger::HandoverAudit) -> String {
    format!(
        "released by {} at {}, finished at {} (epoch s); reset: {}; verification: {}; scrub hook: {}",
        h.released_by, h.released_at, h.finished_at, h.reset_method, h.verification, h.hook
    )
}

/// `bind`, `release`, `reconcile`.
pub fn outcomes(
    verb: &str,
    bdfs: &[Bdf],
    results: &[Result<Outcome, EngineError>],
    output: Output,
    _setup: &Setup,
) -> Result<ExitCode> {
    let values = results
        .iter()
        .map(|r| match r {
            Ok(o) => Ok(serde_json::to_value(o).unwrap_or_default()),
            Err(e) => Err(e.to_string()),
        })
        .collect::<Vec<_>>();
    outcome_values(verb, bdfs, &values, output)
}

/// [`outcomes`] from serialized outcomes (and error texts), as the running
/// `serve` answers them over its admin socket.
pub fn outcome_values(
    verb: &str,
    bdfs: &[Bdf],
    results: &[Result<serde_json::Value, String>],
    output: Output,
) -> Result<ExitCode> {
    let failed = results.iter().filter(|r| r.is_err()).count();
    if output == Output::Json {
        let arr: Vec<_> = bdfs
            .iter()
            .zip(results)
            .map(|(b, r)| match r {
                Ok(o) => o.clone(),
                Err(e) => json!({"pciBusID": b, "action": "failed", "error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
    } else {
        for (b, r) in bdfs.iter().zip(results) {
            match r {
                Ok(o) => println!(
                    "{b}  {:<18} {} ({} ms)",
                    o["action"].as_str().unwrap_or("?"),
                    o["detail"].as_str().unwrap_or_default(),
                    o["millis"].as_u64().unwrap_or_default()
                ),
                Err(e) => println!("{b}  {:<18} {e}", "FAILED"),
            }
        }
    }
    if failed > 0 {
        eprintln!("{verb}: {failed} of {} failed", results.len());
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// `ledger`.
pub fn ledger(body: &LedgerBody, path: &Path, output: Output) -> Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(body)?);
        return Ok(());
    }
    println!("ledger {} (boot {})", path.display(), body.boot_id);
    if body.gpus.is_empty() {
        println!("  (empty: vfio-gpu-dra holds no GPU)");
    }
    for (b, r) in &body.gpus {
        let holder = r
            .holder
            .as_ref()
            .map(|h| h.to_string())
            .unwrap_or_else(|| "nobody".into());
        println!("{b}  {:?}  held by {holder}", r.state);
        if let Some(s) = &r.stuck_on {
            println!("  STUCK on {s}");
        }
        for f in &r.functions {
            println!(
                "  {} came from {} (override {})",
                f.bdf,
                f.original_driver
                    .as_ref()
                    .map(|d| d.as_str())
                    .unwrap_or("no driver"),
                f.original_override.as_deref().unwrap_or("(null)")
            );
        }
        if let Some(h) = &r.handover {
            println!(
                "  hand-over from {} in progress: {:?}",
                h.released_by, h.phase
            );
        }
    }
    for (b, q) in &body.quarantined {
        println!("{b}  QUARANTINED since {}: {}", q.since, q.reason);
    }
    if !body.handovers.is_empty() {
        println!("tenant hand-overs (oldest first):");
        for h in &body.handovers {
            println!("  {}  {}", h.gpu, handover_line(h));
        }
    }
    Ok(())
}

/// One GPU's NVLink facts for `explain`: module id and partition.
fn fabric_line(f: &vfio_gpu_engine::GpuFabric) -> String {
    let module = f
        .module_id
        .map_or_else(|| "unknown".to_string(), |m| m.to_string());
    let partition = match &f.partition {
        Some((id, state, holder)) => format!(
            "partition {id} ({state:?}) held by {}",
            holder
                .as_ref()
                .map_or_else(|| "nobody".to_string(), ToString::to_string)
        ),
        None => "in no partition the ledger records".to_string(),
    };
    format!(
        "NVLink: module id {module}{}, {partition}",
        f.module_source
            .map(|s| format!(" (from {s:?})"))
            .unwrap_or_default()
    )
}
