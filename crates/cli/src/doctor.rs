//! `vfio-gpu-dra doctor`: is this node ready for GPU passthrough, and, for
//! each problem, the exact fix.
//!
//! The facts and the checks are `vfio_gpu_node`'s (the same ones `serve`
//! logs at start); this module only prints them, as a table or JSON.
//! Read-only: it reads the host and the ledger (without the lock), and
//! never writes anything.

use std::process::ExitCode;

use anyhow::{Context, Result};
use std::collections::BTreeMap;

use vfio_gpu_node::fabric::{FabricFacts, diagnose_fabric};
use vfio_gpu_node::{Check, Status, check_node, check_other_drivers_in};

use crate::Output;
use crate::render::cut;
use crate::setup::{HostOpts, StateOpts};

/// Runs `doctor`: prints the report, exit status 1 when any check fails.
pub fn run(host: &HostOpts, state: &StateOpts) -> Result<ExitCode> {
    let setup = host.open_with_state(state)?;
    let view = setup
        .inspect()
        .context("reading the GPUs and their verdicts")?;
    let mut checks = check_node(&setup.root, &view, &setup.policy, &setup.policy_file)
        .with_context(|| format!("reading {}", setup.describe_root()))?;
    // What serve's last slice sync found in the cluster (its record in the
    // shared state directory): doctor itself needs no kubeconfig.
    checks.extend(check_other_drivers_in(&view, setup.state_dir.as_deref()));
    checks.extend(fabric_checks(&setup, &view));
    match host.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
        Output::Table => print!("{}", table(&checks)),
    }
    Ok(if checks.iter().any(|c| c.status == Status::Fail) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The NVLink fabric checks, when a Fabric Manager is configured
/// (`--fm-endpoint`, or the HGX demo); a library that does not load is a
/// failing `fabric-manager` check, not a failed doctor.
fn fabric_checks(setup: &crate::setup::Setup, view: &vfio_gpu_engine::Inspection) -> Vec<Check> {
    let gpus: Vec<vfio_gpu_host::Bdf> = view.gpus.iter().map(|g| g.gpu.bdf()).collect();
    let facts = match setup.fabric_config() {
        Ok(None) => return Vec::new(),
        Ok(Some(fc)) => {
            let ledger: BTreeMap<vfio_gpu_host::Bdf, u32> = view
                .gpus
                .iter()
                .filter_map(|g| {
                    let m = g.fabric.as_ref()?.module_id?;
                    Some((g.gpu.bdf(), m.0))
                })
                .collect();
            FabricFacts::read(
                &setup.root,
                &fc.fm,
                &gpus,
                &ledger,
                fc.module_map_file.as_deref(),
            )
        }
        Err(e) => FabricFacts {
            fm: Some(Err(format!("{e:#}"))),
            ..FabricFacts::default()
        },
    };
    diagnose_fabric(&facts)
}

/// Total width of the table and the wrapped text under it.
const WIDTH: usize = 100;

/// One line per check (status first, ≤ 100 columns), then the full detail
/// and fix of every warning and failure, wrapped.
pub fn table(checks: &[Check]) -> String {
    let mut s = format!("{:<6} {:<19} {:<12} DETAIL\n", "STATUS", "CHECK", "GPU");
    for c in checks {
        let gpu = c.gpu.map(|b| b.to_string()).unwrap_or_default();
        // The GPU column already names it; JSON keeps the self-contained detail.
        let detail = c
            .detail
            .strip_prefix(gpu.as_str())
            .filter(|_| !gpu.is_empty())
            .map(|d| d.trim_start_matches(':').trim_start())
            .unwrap_or(&c.detail);
        let line = format!(
            "{:<6} {:<19} {:<12} {}",
            c.status.word(),
            c.check,
            gpu,
            detail
        );
        s.push_str(&cut(&line, WIDTH));
        s.push('\n');
    }
    let problems: Vec<&Check> = checks.iter().filter(|c| c.status != Status::Pass).collect();
    if problems.is_empty() {
        s.push_str("\nReady for GPU passthrough.\n");
        return s;
    }
    let fails = problems.iter().filter(|c| c.status == Status::Fail).count();
    s.push_str(&format!(
        "\n{fails} failed, {} warnings:\n",
        problems.len() - fails
    ));
    for c in problems {
        let gpu = c.gpu.map(|b| format!(" {b}")).unwrap_or_default();
        s.push_str(&format!("\n{} {}{gpu}\n", c.status.word(), c.check));
        s.push_str(&wrap("  why: ", &c.detail));
        s.push_str(&wrap("  fix: ", &c.fix));
    }
    s
}

/// Whitespace-separated words, a `backquoted span` kept as one so a
/// command or configuration line is never broken across lines.
fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut open = false;
    for w in text.split_whitespace() {
        match out.last_mut() {
            Some(last) if open => {
                last.push(' ');
                last.push_str(w);
            }
            _ => out.push(w.to_string()),
        }
        if w.matches('`').count() % 2 == 1 {
            open = !open;
        }
    }
    out
}

/// Wraps `text` at word boundaries to [`WIDTH`], the first line after
/// `lead`, the rest indented as deep.
fn wrap(lead: &str, text: &str) -> String {
    let indent = " ".repeat(lead.chars().count());
    let mut out = String::new();
    let mut line = lead.to_string();
    let mut empty = true;
    for word in words(text) {
        let word = word.as_str();
        let len = line.chars().count();
        if !empty && len + 1 + word.chars().count() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = indent.clone();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        // A span longer than a line overflows: a cut command would be wrong.
        line.push_str(word);
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_gpu_node::{NodeFacts, check_interrupt_remapping, check_iommu, check_vfio_driver};

    #[test]
    fn table_lines_fit_in_100_columns() {
        let mut f = NodeFacts::ready_intel_example();
        f.groups = 0;
        f.units.clear();
        f.vfio_loaded = None;
        f.module_files.modules_dep_entry = None;
        let checks = vec![
            check_iommu(&f),
            check_interrupt_remapping(&f),
            check_vfio_driver(&f),
        ];
        let t = table(&checks);
        for line in t.lines() {
            assert!(line.chars().count() <= WIDTH, "{line:?}");
        }
        assert!(
            t.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("FAIL   iommu")),
            "{t}"
        );
        assert!(t.contains("  fix: "));
    }

    #[test]
    fn wrap_never_splits_a_backquoted_line() {
        let w = wrap(
            "  fix: ",
            &format!("{} add `softdep nvidia pre: vfio-pci` now", "x".repeat(80)),
        );
        assert!(w.contains("`softdep nvidia pre: vfio-pci`"), "{w}");
    }

    #[test]
    fn wrap_keeps_every_word() {
        let text = "word ".repeat(60);
        let w = wrap("  fix: ", &text);
        assert_eq!(w.split_whitespace().filter(|x| *x == "word").count(), 60);
        assert!(w.lines().all(|l| l.chars().count() <= WIDTH));
    }
}
