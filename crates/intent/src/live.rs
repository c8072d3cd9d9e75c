//! Intent as it is on disk now. A long-running plugin must honour a driverctl
//! file, a modprobe.d option or a policy entry the admin adds while a claim is
//! prepared, so every operation reads the sources afresh instead of keeping
//! what it saw at start.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vfio_gpu_host::HostRoot;

use crate::modprobe::ConfigProblem;
use crate::policy::Policy;
use crate::verdict::IntentSources;

/// Where the policy comes from.
#[derive(Clone, Debug)]
enum PolicySource {
    /// Given once (tests, `--demo` without a file).
    Fixed(Policy),
    /// Re-read from this file (a missing file is the default policy).
    File(PathBuf),
}

/// Reads the admin's intent afresh on every call.
#[derive(Debug)]
pub struct LiveIntent {
    root: HostRoot,
    policy: PolicySource,
    /// The last policy that parsed: binding settings (allowed foreign members,
    /// vfio driver) keep working while the admin is mid-edit.
    last_good: Mutex<Policy>,
}

/// One consistent reading of every source.
#[derive(Clone, Debug)]
pub struct IntentSnapshot {
    /// The policy in force (the last one that parsed, if the file is broken now).
    pub policy: Policy,
    /// Every source, with a policy problem recorded when the file did not parse.
    pub sources: IntentSources,
}

impl LiveIntent {
    /// A fixed policy; the host's sources are still read on every call.
    pub fn fixed(root: HostRoot, policy: Policy) -> LiveIntent {
        LiveIntent {
            root,
            last_good: Mutex::new(policy.clone()),
            policy: PolicySource::Fixed(policy),
        }
    }

    /// The policy is re-read from `path` on every call; `initial` is what was
    /// read at start and stands in while the file does not parse.
    pub fn from_file(root: HostRoot, path: &Path, initial: Policy) -> LiveIntent {
        LiveIntent {
            root,
            last_good: Mutex::new(initial),
            policy: PolicySource::File(path.to_path_buf()),
        }
    }

    /// Reads every source now. Never fails: a policy file that does not parse
    /// becomes a problem that counts as admin intent (keep on vfio), as any
    /// unreadable configuration does.
    pub fn read(&self) -> IntentSnapshot {
        let (policy, problem) = match &self.policy {
            PolicySource::Fixed(p) => (p.clone(), None),
            PolicySource::File(path) => {
                let mut last = self.last_good.lock().unwrap_or_else(|p| p.into_inner());
                match Policy::load_or_default(&self.root, path) {
                    Ok(p) => {
                        *last = p.clone();
                        (p, None)
                    }
                    Err(e) => (
                        last.clone(),
                        Some(ConfigProblem {
                            path: path.display().to_string(),
                            error: e.to_string(),
                        }),
                    ),
                }
            }
        };
        let mut sources = IntentSources::load(&self.root, &policy);
        sources.policy_problem = problem;
        IntentSnapshot { policy, sources }
    }
}
