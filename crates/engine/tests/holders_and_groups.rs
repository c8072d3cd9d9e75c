#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! How the engine reads the host before a move: which functions of an IOMMU
//! group are foreign, who holds a GPU's device nodes (nvidia-persistenced,
//! sound servers, VMs by fdinfo; failing closed), and how a vfio driver is
//! recognised. Regression tests for the host-side findings of the
//! 2026-11-30 engine review (M5, M6, m7, m9, m21 …), one test per finding.

mod common;

use common::*;
use vfio_gpu_engine::EngineError;
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};

/// R8 / M6: an Intel xHCI in B's IOMMU group is not B's companion; the move
/// is refused without allow-foreign-group-members and nothing is written.
#[test]
fn chipset_usb_in_the_group_is_foreign_and_blocks_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let mut h = FixtureHost::open(&host);
    h.add_driver("xhci_hcd").unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:14.0"), 0x8086, 0xa36d, 0x0c0330)
            .driver("xhci_hcd")
            .group(12),
    )
    .unwrap();
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(
        matches!(&err, EngineError::ForeignGroupMembers { members, .. } if members.contains("0000:00:14.0")),
        "{err}"
    );
    assert!(k.log().is_empty(), "{:?}", k.log());
    assert_eq!(
        driver_of(&host, "0000:00:14.0").as_deref(),
        Some("xhci_hcd")
    );
}

/// A host where GPU B is held only by nvidia-persistenced, as a real kernel
/// shows it (comm truncated to "nvidia-persiste").
fn persistenced_host(dir: &std::path::Path) -> std::path::PathBuf {
    let host = dir.join("host");
    let h = build_host(&host);
    h.write(
        "proc/driver/nvidia/gpus/0000:66:00.0/information",
        "Device Minor: 3\n",
    )
    .unwrap();
    h.write("usr/bin/nvidia-smi", "#!/bin/sh\n").unwrap();
    add_persistenced_process(&host, 99, 3);
    host
}

fn nodes_of_b(host: &std::path::Path) -> Vec<std::path::PathBuf> {
    let root = vfio_gpu_host::HostRoot::open(host).unwrap();
    let f = vfio_gpu_host::PciFunction::read(&root, bdf(B)).unwrap();
    vfio_gpu_engine::preflight::device_nodes(&root, &f)
}

/// M5: the daemon is recognised by its executable, not by its truncated comm;
/// an impostor that only renames its comm is not.
#[test]
fn persistenced_is_identified_by_exe_not_truncated_comm() {
    let dir = tempfile::tempdir().unwrap();
    let host = persistenced_host(dir.path());
    // An impostor: comm says nvidia-persiste, the binary is something else.
    let p = host.join("proc/98");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::write(p.join("comm"), "nvidia-persiste\n").unwrap();
    std::fs::write(p.join("cmdline"), "/opt/x/miner\0").unwrap();
    std::os::unix::fs::symlink("/opt/x/miner", p.join("exe")).unwrap();
    std::os::unix::fs::symlink(host.join("dev/nvidia3"), p.join("fd/9")).unwrap();
    let root = vfio_gpu_host::HostRoot::open(&host).unwrap();
    let mut holders = vfio_gpu_engine::preflight::find_holders(&root, &nodes_of_b(&host));
    holders.sort_by_key(|h| h.pid);
    let seen: Vec<(u32, &str, bool)> = holders
        .iter()
        .map(|h| (h.pid, h.comm.as_str(), h.is_nvidia_persistenced()))
        .collect();
    assert_eq!(
        seen,
        [
            (98, "nvidia-persiste", false),
            (99, "nvidia-persiste", true)
        ]
    );
}

/// M5 end to end: with persistence mode on, the move turns it off instead of
/// refusing the GPU as Busy.
#[test]
fn persistenced_with_truncated_comm_does_not_make_the_gpu_busy() {
    let dir = tempfile::tempdir().unwrap();
    let host = persistenced_host(dir.path());
    let k = sim(&host);
    struct Smi(std::path::PathBuf);
    impl vfio_gpu_engine::commands::HostCommands for Smi {
        fn run(
            &self,
            _root: &vfio_gpu_host::HostRoot,
            _program: &str,
            args: &[&str],
        ) -> Result<String, String> {
            if args.ends_with(&["-pm", "0"]) {
                let _ = std::fs::remove_file(self.0.join("proc/99/fd/4"));
            }
            Ok(String::new())
        }
    }
    let e = engine_with_commands(
        &k,
        &dir.path().join("state"),
        std::sync::Arc::new(Smi(host.clone())),
    );
    let out = e.configure(bdf(B), claim("u1"));
    assert!(
        matches!(&out, Ok(o) if o.action == vfio_gpu_engine::Action::Moved),
        "{out:?}"
    );
    assert_eq!(
        e.ledger().gpus[&bdf(B)].changes.persistence_disabled,
        vec![bdf(B)]
    );
}

// ---- m9: the holder scan fails closed and only looks at device fds ----

use vfio_gpu_engine::preflight::{device_nodes, find_holders};

fn host_root(p: &std::path::Path) -> vfio_gpu_host::HostRoot {
    vfio_gpu_host::HostRoot::open(p).unwrap()
}

fn b_nvidia_host(dir: &std::path::Path) -> std::path::PathBuf {
    let host = dir.join("host");
    let h = build_host(&host);
    h.write(
        "proc/driver/nvidia/gpus/0000:66:00.0/information",
        "Device Minor: 3\n",
    )
    .unwrap();
    host
}

/// An unreadable /proc is not "no holders".
#[test]
fn unreadable_proc_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let host = b_nvidia_host(dir.path());
    std::fs::write(host.join("dev/nvidia3"), "").unwrap();
    let nodes = nodes_of_b(&host);
    // /proc that cannot be listed (here: replaced by a file).
    let proc_dir = host.join("proc");
    let saved = dir.path().join("proc.saved");
    std::fs::rename(&proc_dir, &saved).unwrap();
    std::fs::write(&proc_dir, "").unwrap();
    let holders = find_holders(&host_root(&host), &nodes);
    assert!(
        !holders.is_empty() && holders.iter().all(|h| h.pid == 0),
        "{holders:?}"
    );
    assert!(
        holders[0].to_string().contains("holder scan failed"),
        "{}",
        holders[0]
    );
}

/// A missing /dev/nvidiaN with no way to know its device number is an error;
/// with the major from /proc/devices, a process holding the node through its
/// own /dev is found by st_rdev.
#[test]
fn missing_nvidia_node_uses_proc_devices_or_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let host = b_nvidia_host(dir.path());
    let nodes = nodes_of_b(&host);
    assert!(!host.join("dev/nvidia3").exists());
    let holders = find_holders(&host_root(&host), &nodes);
    assert!(
        holders.len() == 1 && holders[0].pid == 0,
        "no node, no major: fail closed: {holders:?}"
    );
    // The real /dev/null is char 1:3: pretend nvidia's major is 1, so a
    // process whose fd reads back "/dev/null" holds "nvidia3".
    std::fs::write(
        host.join("proc/devices"),
        "Character devices:\n  1 mem\n  1 nvidia-frontend\n195 nvidia\n\nBlock devices:\n  8 sd\n",
    )
    .unwrap();
    assert_eq!(find_holders(&host_root(&host), &nodes), vec![]);
    let p = host.join("proc/4242");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::write(p.join("comm"), "cuda-app\n").unwrap();
    std::os::unix::fs::symlink("/dev/null", p.join("fd/7")).unwrap();
    let holders = find_holders(&host_root(&host), &nodes);
    assert_eq!(
        holders
            .iter()
            .map(|h| (h.pid, h.comm.as_str()))
            .collect::<Vec<_>>(),
        [(4242, "cuda-app")]
    );
    assert_eq!(
        holders[0].to_string(),
        "cuda-app (pid 4242) holds /dev/nvidia3"
    );
}

/// fds are filtered by their link text before any stat: a file outside
/// /dev (an NFS or FUSE mount could hang a stat) is never examined, even
/// when it is the same inode.
#[test]
fn fds_outside_dev_are_not_examined() {
    let dir = tempfile::tempdir().unwrap();
    let host = b_nvidia_host(dir.path());
    std::fs::write(host.join("dev/nvidia3"), "").unwrap();
    let elsewhere = dir.path().join("nfs");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::hard_link(host.join("dev/nvidia3"), elsewhere.join("same-inode")).unwrap();
    let p = host.join("proc/31");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::write(p.join("comm"), "backup\n").unwrap();
    std::os::unix::fs::symlink(elsewhere.join("same-inode"), p.join("fd/3")).unwrap();
    assert_eq!(find_holders(&host_root(&host), &nodes_of_b(&host)), vec![]);
}

/// The HDA companion's ALSA nodes are checked: a sound server holding
/// /dev/snd/pcmC1D3p makes the GPU busy.
#[test]
fn hda_companion_sound_nodes_are_holders() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    let audio = FixtureHost::open(&host).device_dir(bdf(A_AUDIO)).unwrap();
    for n in ["controlC1", "pcmC1D3p", "hwC1D0"] {
        std::fs::create_dir_all(audio.join("sound/card1").join(n)).unwrap();
    }
    h.write("dev/snd/pcmC1D3p", "").unwrap();
    h.write("dev/snd/controlC1", "").unwrap();
    h.write("dev/snd/hwC1D0", "").unwrap();
    let root = host_root(&host);
    let f = vfio_gpu_host::PciFunction::read(&root, bdf(A_AUDIO)).unwrap();
    let nodes = device_nodes(&root, &f);
    let mut names: Vec<String> = nodes
        .iter()
        .map(|n| n.strip_prefix(&host).unwrap().display().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["dev/snd/controlC1", "dev/snd/hwC1D0", "dev/snd/pcmC1D3p"]
    );
    let p = host.join("proc/700");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::write(p.join("comm"), "pipewire\n").unwrap();
    std::os::unix::fs::symlink(host.join("dev/snd/pcmC1D3p"), p.join("fd/12")).unwrap();
    let holders = find_holders(&root, &nodes);
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert_eq!(
        holders[0].to_string(),
        "pipewire (pid 700) holds /dev/snd/pcmC1D3p"
    );
    // End to end: the move of A is refused and nothing is written.
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(A), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::Busy { .. }), "{err}");
    assert!(k.log().is_empty(), "{:?}", k.log());
}

/// A VM's device fd (`anon_inode:[vfio-device]`) is attributed through
/// fdinfo's vfio-device-syspath, without any node path.
#[test]
fn vfio_device_fds_are_attributed_by_fdinfo() {
    let (_dir, host, _k, e) = world();
    e.configure(bdf(B), claim("u1")).unwrap();
    let root = host_root(&host);
    let f = vfio_gpu_host::PciFunction::read(&root, bdf(B)).unwrap();
    let nodes = device_nodes(&root, &f);
    let p = host.join("proc/777");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::create_dir_all(p.join("fdinfo")).unwrap();
    std::fs::write(p.join("comm"), "qemu-kvm\n").unwrap();
    std::os::unix::fs::symlink("anon_inode:[vfio-device]", p.join("fd/40")).unwrap();
    std::fs::write(
        p.join("fdinfo/40"),
        "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nvfio-device-syspath: /sys/devices/pci0000:66/0000:66:00.0\n",
    )
    .unwrap();
    let holders = find_holders(&root, &nodes);
    assert_eq!(
        holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        [777],
        "{holders:?}"
    );
    // Another device's fd is not this GPU's holder.
    std::fs::write(
        p.join("fdinfo/40"),
        "vfio-device-syspath: /sys/devices/pci0000:65/0000:65:00.0\n",
    )
    .unwrap();
    assert_eq!(find_holders(&root, &nodes), vec![]);
}

/// m11: "on vfio" was decided from the driver's name alone (`vfio-pci`, `*vfio_pci*`,
/// `*-vfio`). A vfio driver under another name (an out-of-tree vendor variant) has the
/// kernel's `vfio-dev/vfioN` class device all the same: the GPU is on vfio, found
/// there without a record of ours, so it is the admin's, recorded, never moved and
/// never "returned" to another driver.
#[test]
fn a_vfio_driver_is_recognised_by_its_vfio_dev_not_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let mut h = FixtureHost::open(&host);
    let g = bdf("0000:6b:00.0");
    h.add_function(
        // Not in the host's vfio-pci.ids=10de:2330: only its binding speaks.
        &FunctionSpec::new(g, 0x10de, 0x2335, 0x030200)
            .driver("acme_passthru")
            .group(17),
    )
    .unwrap();
    let vfio = h.add_vfio_dev(g).unwrap();
    h.write(&format!("dev/vfio/devices/{vfio}"), "").unwrap();
    h.write("dev/vfio/17", "").unwrap();
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let (views, _) = e.discover().unwrap();
    let view = views.iter().find(|v| v.gpu.bdf() == g).expect("found");
    assert!(view.verdict.keep_on_vfio, "{:?}", view.verdict);
    let done = e.configure(g, claim("u1")).unwrap();
    assert_eq!(done.action, vfio_gpu_engine::Action::AlreadyOnVfio);
    let released = e.unconfigure(g, None).unwrap();
    assert_eq!(released.action, vfio_gpu_engine::Action::LeftOnVfio);
    // Kept on vfio, never moved; reset for the next tenant all the same.
    assert_eq!(k.log(), vec![write::reset("0000:6b:00.0")]);
    assert_eq!(
        driver_of(&host, "0000:6b:00.0").as_deref(),
        Some("acme_passthru")
    );
}

/// M4 (capabilities): a descriptor whose link the scan may not read is not
/// "no holder". Without CAP_SYS_PTRACE the kernel answers EACCES for every
/// root process's `/proc/<pid>/fd/<n>`, and a scan that skipped those would
/// hand out a GPU a VM holds; here a descriptor entry that is no link at all
/// (EINVAL) stands in for it. Only a vanished descriptor (ENOENT) is skipped.
#[test]
fn an_unreadable_descriptor_fails_the_scan_closed() {
    let dir = tempfile::tempdir().unwrap();
    let host = b_nvidia_host(dir.path());
    std::fs::write(host.join("dev/nvidia3"), "").unwrap();
    let nodes = nodes_of_b(&host);
    let p = host.join("proc/77");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::write(p.join("comm"), "qemu\n").unwrap();
    std::fs::write(p.join("fd/5"), "").unwrap();
    let holders = find_holders(&host_root(&host), &nodes);
    assert!(
        holders.len() == 1 && holders[0].pid == 0,
        "an unreadable descriptor must fail the scan closed: {holders:?}"
    );
    assert!(
        holders[0].to_string().contains("proc/77/fd/5"),
        "the error names the descriptor: {}",
        holders[0]
    );
}
