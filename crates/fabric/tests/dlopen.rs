//! The real `dlopen` path: `NvfmLibrary` loads the `fake-nvfm` cdylib (built
//! here with `cargo build -p fake-nvfm`) and drives the simulator through the
//! hand-declared C ABI.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tempfile::TempDir;
use vfio_gpu_fabric::{
    Activated, Call, Deactivated, DeadlineFm, Dialect, Endpoint, FabricManager, Fault, FaultAction,
    FmCode, FmError, NvfmConfig, NvfmLibrary, NvmlError, NvmlModuleIds, PartitionId, Platform,
    SimState,
};

const P: fn(u32) -> PartitionId = PartitionId;

/// Builds the fake once per test binary and returns its path.
fn fake_library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| vfio_gpu_fabric::testing::build_fake_library("fake-nvfm", "libnvfm.so"))
}

/// A private copy of the fake (its own globals) as `dir/libnvfm.so.1`.
fn install(dir: &Path) {
    std::fs::copy(fake_library(), dir.join("libnvfm.so.1")).expect("copy fake");
}

fn write_state(path: &Path, state: &SimState) {
    std::fs::write(path, serde_json::to_string(state).expect("json")).expect("write state");
}

fn read_state(path: &Path) -> SimState {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read state")).expect("parse state")
}

struct Fm {
    _dir: TempDir,
    state: PathBuf,
    lib: NvfmLibrary,
}

/// A fake FM reached over a Unix "socket" (its state file).
fn setup(platform: Platform, dialect: Dialect, tweak: impl FnOnce(&mut SimState)) -> Fm {
    let dir = TempDir::new().expect("tempdir");
    install(dir.path());
    let state = dir.path().join("fm-socket");
    let mut s = SimState::new(platform);
    s.dialect = dialect;
    tweak(&mut s);
    write_state(&state, &s);
    let lib = NvfmLibrary::open_in(dir.path(), NvfmConfig::new(Endpoint::Unix(state.clone())))
        .expect("open fake libnvfm");
    Fm {
        _dir: dir,
        state,
        lib,
    }
}

fn active(fm: &dyn FabricManager) -> Vec<u32> {
    fm.get_supported_partitions()
        .expect("list")
        .active()
        .iter()
        .map(|p| p.0)
        .collect()
}

#[test]
fn list_activate_deactivate_round_trip() {
    let fm = setup(Platform::HgxH100, Dialect::Documented, |_| {});
    assert!(fm.lib.path().ends_with("libnvfm.so.1"));
    let list = fm.lib.get_supported_partitions().unwrap();
    assert_eq!(list.partitions.len(), 15);
    assert_eq!(list.max_num_partitions, 64);
    let p3 = list.get(P(3)).unwrap();
    let modules: Vec<u32> = p3.modules().map(|m| m.0).collect();
    assert_eq!(modules, vec![1, 3], "non-adjacent H100 pair marshalled");
    assert_eq!(p3.gpus[0].pci_bus_id, "00000000:00:00.0");
    assert_eq!(p3.gpus[0].nvlink_line_rate_mbps, 26_562);
    let all = list.get(P(0)).unwrap();
    assert_eq!(all.gpus.len(), 8);

    assert_eq!(fm.lib.activate(P(3)).unwrap(), Activated::Activated);
    assert_eq!(fm.lib.activate(P(6)).unwrap(), Activated::Activated);
    assert_eq!(active(&fm.lib), vec![3, 6]);
    assert_eq!(fm.lib.deactivate(P(3)).unwrap(), Deactivated::Deactivated);
    assert_eq!(active(&fm.lib), vec![6]);
    assert_eq!(read_state(&fm.state).active.len(), 1);

    assert!(fm.lib.get_nvlink_failed_devices().unwrap().gpus.is_empty());
    assert!(fm.lib.get_unsupported_partitions().unwrap().is_empty());

    let s = read_state(&fm.state);
    // One connect per operation, v2 with addressType UNIX, 1000 ms timeout.
    assert!(s.connects.len() >= 8);
    for c in &s.connects {
        assert_eq!(c.version, 0x0200_0110);
        assert_eq!(c.address_type, Some(2));
        assert_eq!(c.address_is_unix_socket, 1);
        assert_eq!(c.timeout_ms, 1000);
        assert_eq!(Path::new(&c.address_info), fm.state);
    }
    assert_eq!(fm.lib.connect_version(), 2);
}

#[test]
fn dialects_through_the_library() {
    for (dialect, in_use, not_in_use) in [
        (Dialect::Documented, FmCode::InUse, FmCode::Uninitialized),
        (
            Dialect::Newer,
            FmCode::PartitionIdInUse,
            FmCode::PartitionIdNotInUse,
        ),
    ] {
        let fm = setup(Platform::HgxB200, dialect, |_| {});
        fm.lib.activate(P(2)).unwrap();
        assert_eq!(
            fm.lib.activate(P(2)).unwrap(),
            Activated::AlreadyActive(in_use)
        );
        match fm.lib.activate(P(4)) {
            Err(FmError::Overlap { active, code, .. }) => {
                assert_eq!(active, vec![P(2)]);
                assert_eq!(code, in_use);
            }
            other => panic!("{other:?}"),
        }
        fm.lib.deactivate(P(2)).unwrap();
        assert_eq!(
            fm.lib.deactivate(P(2)).unwrap(),
            Deactivated::NotActive(not_in_use)
        );
    }
}

#[test]
fn restart_replay_through_the_library() {
    let fm = setup(Platform::HgxH100, Dialect::Documented, |_| {});
    fm.lib.activate(P(1)).unwrap();
    let mut s = read_state(&fm.state);
    s.restart_resilient(vfio_gpu_fabric::Clock::now_ms(
        &vfio_gpu_fabric::SystemClock,
    ));
    write_state(&fm.state, &s);
    let e = fm.lib.get_supported_partitions().unwrap_err();
    assert!(e.is_retryable(), "{e}");
    fm.lib.set_activated_partitions(&[P(1), P(5)]).unwrap();
    assert_eq!(active(&fm.lib), vec![1, 5]);
    let too_many: Vec<PartitionId> = (0..65).map(P).collect();
    assert!(matches!(
        fm.lib.set_activated_partitions(&too_many),
        Err(FmError::Abi { .. })
    ));
}

#[test]
fn oversized_partition_count_is_an_abi_error() {
    let fm = setup(Platform::HgxH100, Dialect::Documented, |s| {
        s.corrupt_partition_count = true;
    });
    match fm.lib.get_supported_partitions() {
        Err(FmError::Abi { call, detail }) => {
            assert_eq!(call, Call::GetSupportedPartitions);
            assert!(detail.contains("numPartitions = 65"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn v1_only_library_falls_back_and_vsock_cannot() {
    let fm = setup(Platform::HgxH100, Dialect::Documented, |s| {
        s.connect_versions = vec![1];
    });
    fm.lib.get_supported_partitions().unwrap();
    assert_eq!(fm.lib.connect_version(), 1);
    fm.lib.get_supported_partitions().unwrap();
    let s = read_state(&fm.state);
    let versions: Vec<u32> = s.connects.iter().map(|c| c.version).collect();
    // v2 refused once, then v1 directly.
    assert_eq!(versions, vec![0x0200_0110, 0x0100_010c, 0x0100_010c]);
    assert_eq!(s.connects[1].address_type, None);
    assert_eq!(s.connects[1].address_is_unix_socket, 1);

    // Fallback off: the mismatch surfaces.
    let dir = TempDir::new().unwrap();
    install(dir.path());
    let mut cfg = NvfmConfig::new(Endpoint::Unix(fm.state.clone()));
    cfg.allow_v1_connect = false;
    let strict = NvfmLibrary::open_in(dir.path(), cfg).unwrap();
    assert!(
        strict
            .get_supported_partitions()
            .unwrap_err()
            .is_version_mismatch()
    );

    // vsock exists only in the v2 struct: no fallback.
    let port = 40_000 + (std::process::id() % 20_000);
    let state = std::env::temp_dir().join(format!("fake-nvfm-vsock-7_{port}.json"));
    let mut v1_only = SimState::new(Platform::HgxB200);
    v1_only.connect_versions = vec![1];
    write_state(&state, &v1_only);
    let dir = TempDir::new().unwrap();
    install(dir.path());
    let ep: Endpoint = format!("vsock:7:{port}").parse().unwrap();
    let lib = NvfmLibrary::open_in(dir.path(), NvfmConfig::new(ep)).unwrap();
    let e = lib.get_supported_partitions().unwrap_err();
    let _ = std::fs::remove_file(&state);
    assert!(e.is_version_mismatch(), "{e}");
}

#[test]
fn inet_and_vsock_endpoints_set_address_type() {
    let state_dir = std::env::temp_dir();
    let port = 20_000 + (std::process::id() % 20_000);
    for (endpoint, kind, ty, info) in [
        (
            format!("tcp:127.0.0.1:{port}"),
            "inet",
            1,
            format!("127.0.0.1:{port}"),
        ),
        (format!("vsock:3:{port}"), "vsock", 3, format!("3:{port}")),
    ] {
        let name: String = info
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let state = state_dir.join(format!("fake-nvfm-{kind}-{name}.json"));
        write_state(&state, &SimState::new(Platform::HgxB200));
        let dir = TempDir::new().unwrap();
        install(dir.path());
        let ep: Endpoint = endpoint.parse().unwrap();
        let lib = NvfmLibrary::open_in(dir.path(), NvfmConfig::new(ep)).unwrap();
        assert_eq!(lib.activate(P(1)).unwrap(), Activated::Activated);
        let s = read_state(&state);
        let _ = std::fs::remove_file(&state);
        let c = &s.connects[0];
        assert_eq!(c.address_type, Some(ty), "{endpoint}");
        assert_eq!(c.address_is_unix_socket, 0);
        assert_eq!(c.address_info, info);
    }
}

#[test]
fn no_fm_listening_is_a_connection_error() {
    let dir = TempDir::new().unwrap();
    install(dir.path());
    let lib = NvfmLibrary::open_in(
        dir.path(),
        NvfmConfig::new(Endpoint::Unix(dir.path().join("absent"))),
    )
    .unwrap();
    let e = lib.get_supported_partitions().unwrap_err();
    assert!(e.is_connection(), "{e}");
}

#[test]
fn faults_and_unknown_codes_through_the_library() {
    let fm = setup(Platform::HgxH100, Dialect::Documented, |s| {
        s.faults.push(Fault {
            call: Call::Activate,
            action: FaultAction::Return(-10),
            times: Some(1),
        });
        s.faults.push(Fault {
            call: Call::Deactivate,
            action: FaultAction::Return(-42),
            times: Some(1),
        });
    });
    assert_eq!(
        fm.lib.activate(P(7)).unwrap_err().code(),
        Some(FmCode::NvlinkError)
    );
    assert_eq!(fm.lib.activate(P(7)).unwrap(), Activated::Activated);
    assert!(matches!(
        fm.lib.deactivate(P(7)),
        Err(FmError::UnknownCode { raw: -42, .. })
    ));
    assert_eq!(fm.lib.deactivate(P(7)).unwrap(), Deactivated::Deactivated);
}

#[test]
fn deadline_over_the_library() {
    let fm = setup(Platform::HgxH100, Dialect::Documented, |s| {
        s.faults.push(Fault {
            call: Call::Activate,
            action: FaultAction::SleepMs(400),
            times: Some(1),
        });
    });
    let state = fm.state.clone();
    let timed = DeadlineFm::new(Arc::new(fm.lib), Duration::from_millis(50));
    assert!(matches!(
        timed.activate(P(0)),
        Err(FmError::Deadline { .. })
    ));
    assert!(matches!(timed.activate(P(0)), Err(FmError::Stuck(_))));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(timed.blocked_on(), None);
    // The late call did activate.
    assert!(read_state(&state).active.contains(&P(0)));
    let r = timed.call_within("list", Duration::from_secs(5), |fm| {
        fm.get_supported_partitions()
    });
    assert_eq!(r.unwrap().active(), vec![P(0)]);
}

#[test]
fn two_handles_share_one_init() {
    let fm = setup(Platform::HgxH100, Dialect::Documented, |_| {});
    let dir = fm.lib.path().parent().unwrap().to_path_buf();
    let second =
        NvfmLibrary::open_in(&dir, NvfmConfig::new(Endpoint::Unix(fm.state.clone()))).unwrap();
    second.activate(P(1)).unwrap();
    drop(second);
    // The first user still works: fmLibShutdown waits for the last user.
    assert_eq!(active(&fm.lib), vec![1]);
}

#[test]
fn load_errors_are_clear() {
    let dir = TempDir::new().unwrap();
    let e =
        NvfmLibrary::open_in(dir.path(), NvfmConfig::new(Endpoint::default_unix())).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, FmError::Load { .. }));
    assert!(
        text.contains("libnvfm.so.1") && text.contains("libnvfm.so:"),
        "{text}"
    );

    let e = NvfmLibrary::open_path(
        Path::new("libc.so.6"),
        NvfmConfig::new(Endpoint::default_unix()),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            FmError::MissingSymbol {
                symbol: "fmLibInit",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn nvml_without_module_id_symbol_is_a_clear_error() {
    match NvmlModuleIds::open_path(Path::new("libc.so.6")) {
        Err(NvmlError::MissingSymbol { symbol, .. }) => assert_eq!(symbol, "nvmlInit_v2"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("libc is not NVML"),
    }
    // The fake FM library is no NVML either.
    match NvmlModuleIds::open_path(fake_library()) {
        Err(e @ NvmlError::MissingSymbol { .. }) => {
            assert!(e.to_string().contains("nvmlInit_v2"), "{e}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the fake is not NVML"),
    }
    let e = NvmlModuleIds::open_path(Path::new("/nonexistent/libnvidia-ml.so.1"));
    assert!(matches!(e, Err(NvmlError::Load { .. })));
}

#[test]
fn library_initialised_by_someone_else_is_used_and_left_initialised() {
    let dir = TempDir::new().unwrap();
    install(dir.path());
    let path = dir.path().join("libnvfm.so.1");
    let state = dir.path().join("fm-socket");
    write_state(&state, &SimState::new(Platform::HgxH100));
    // SAFETY: loads the test's own fake library copy.
    let other = unsafe { libloading::Library::new(&path) }.unwrap();
    // SAFETY: `fmLibInit` is `int(void)` in the fake (and the SDK).
    let init = unsafe { other.get::<unsafe extern "C" fn() -> i32>(b"fmLibInit\0") }.unwrap();
    // SAFETY: plain C call into the loaded library.
    assert_eq!(unsafe { init() }, 0);
    let lib = NvfmLibrary::open_path(&path, NvfmConfig::new(Endpoint::Unix(state))).unwrap();
    assert_eq!(lib.activate(P(0)).unwrap(), Activated::Activated);
    drop(lib);
    // We did not initialise it, so we did not shut it down.
    // SAFETY: as above.
    assert_eq!(unsafe { init() }, FmCode::InUse.raw());
}
