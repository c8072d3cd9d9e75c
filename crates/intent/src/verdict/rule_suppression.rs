//! Host-driver suppression (blacklist, `install … /bin/false`) and
//! corroborating facts: signals, not decisions.

use super::*;

/// Applies this source's rule to `v`.
pub(super) fn apply(v: &mut Verdict, input: &RuleInput<'_>) {
    let &RuleInput { src, gpu, fns, .. } = input;
    // Host-driver suppression and corroboration: facts, not decisions.
    // The vendor's whole stack: blacklisting nvidia_drm keeps nvidia off too.
    let mut relevant: BTreeSet<String> =
        vfio_gpu_host::vendor_modules(gpu.function.identity.vendor)
            .all()
            .map(str::to_string)
            .collect();
    for f in fns {
        if let Some(d) = f.driver
            && !f.on_vfio
        {
            relevant.insert(module_of_driver(d.as_str()));
        }
    }
    let mut suppressed = BTreeSet::new();
    for s in &src.suppressions {
        if relevant.contains(&s.module) {
            suppressed.insert(s.module.clone());
            v.signal(s.source, s.detail.clone());
        }
    }
    v.host_driver_suppressed = suppressed.into_iter().collect();
    for (module, sig) in &src.corroborations {
        if relevant.contains(module) || module == "drm" || module == VFIO_PCI_MODULE {
            v.signals.push(sig.clone());
        }
    }
}
