//! The real NVML `dlopen` path: `NvmlModuleIds` loads the `fake-nvml`
//! cdylib (built here with `cargo build -p fake-nvml`), which answers from
//! the JSON file `$FAKE_NVML_STATE` and, like NVML, sees only GPUs bound to
//! `nvidia`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use vfio_gpu_fabric::{ModuleId, NvmlError, NvmlModuleIds};
use vfio_gpu_host::Bdf;

/// `$FAKE_NVML_STATE` is process-wide: the tests of this binary take turns.
static ENV: Mutex<()> = Mutex::new(());

fn fake_nvml() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| vfio_gpu_fabric::testing::build_fake_library("fake-nvml", "libfake_nvml.so"))
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// Runs `f` with `$FAKE_NVML_STATE` naming a file holding `state`, and a
/// private copy of the fake installed as `libnvidia-ml.so.1`.
fn with_nvml(state: &serde_json::Value, f: impl FnOnce(&NvmlModuleIds, &Path)) {
    let _turn = ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml(), &lib).unwrap();
    let file = dir.path().join("nvml.json");
    std::fs::write(&file, state.to_string()).unwrap();
    // SAFETY: every test of this binary holds `ENV` while the variable is
    // set and read; nothing else in the process reads it.
    unsafe { std::env::set_var("FAKE_NVML_STATE", &file) };
    let nvml = NvmlModuleIds::open_path(&lib).unwrap();
    f(&nvml, dir.path());
}

#[test]
fn reads_module_ids_through_dlopen() {
    let state = serde_json::json!({"modules": {"0000:9a:00.0": 1, "0000:ab:00.0": 3}});
    with_nvml(&state, |nvml, _| {
        assert_eq!(
            nvml.module_id(bdf("0000:9a:00.0")).unwrap(),
            Some(ModuleId(1))
        );
        assert_eq!(
            nvml.module_id(bdf("0000:ab:00.0")).unwrap(),
            Some(ModuleId(3))
        );
        // Not an NVIDIA GPU NVML knows: NVML_ERROR_NOT_FOUND (6), named.
        match nvml.module_id(bdf("0000:01:00.0")) {
            Err(e @ NvmlError::Call { code: 6, .. }) => {
                assert!(e.to_string().contains("0000:01:00.0"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn module_id_zero_is_no_module_id() {
    // NVML: "for non-baseboard products … always 0".
    let state = serde_json::json!({"modules": {"0000:9a:00.0": 0}});
    with_nvml(&state, |nvml, _| {
        assert_eq!(nvml.module_id(bdf("0000:9a:00.0")).unwrap(), None);
    });
}

#[test]
fn a_gpu_not_on_nvidia_has_no_readable_module_id() {
    let dir = tempfile::tempdir().unwrap();
    let devs = dir.path().join("sys/bus/pci/devices");
    for (gpu, driver) in [("0000:9a:00.0", "nvidia"), ("0000:ab:00.0", "vfio-pci")] {
        std::fs::create_dir_all(devs.join(gpu)).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../bus/pci/drivers/{driver}"),
            devs.join(gpu).join("driver"),
        )
        .unwrap();
    }
    let state = serde_json::json!({
        "modules": {"0000:9a:00.0": 1, "0000:ab:00.0": 3},
        "hostRoot": dir.path(),
    });
    with_nvml(&state, |nvml, _| {
        assert_eq!(
            nvml.module_id(bdf("0000:9a:00.0")).unwrap(),
            Some(ModuleId(1))
        );
        assert!(matches!(
            nvml.module_id(bdf("0000:ab:00.0")),
            Err(NvmlError::Call { code: 6, .. })
        ));
    });
}

#[test]
fn nvml_init_failure_is_the_init_calls_error() {
    let state = serde_json::json!({"modules": {}, "initResult": 9});
    with_nvml(&state, |nvml, _| {
        match nvml.module_id(bdf("0000:9a:00.0")) {
            Err(NvmlError::Call { call, code: 9, .. }) => assert_eq!(call, "nvmlInit_v2"),
            other => panic!("{other:?}"),
        }
    });
}
