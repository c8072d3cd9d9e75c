//! Module id ↔ BDF map, from ranked sources, with conflict detection.
//!
//! FM on H100+ reports partitions by module id with empty BDFs, and NVML can
//! read a module id only while the GPU is on `nvidia`; so the map has several
//! sources (reference §6, §11), ranked:
//!
//! 1. [`ModuleSource::Nvml`]: read live from the GPU.
//! 2. [`ModuleSource::Ledger`]: what an earlier run recorded (a hint).
//! 3. [`ModuleSource::AdminMap`]: the admin's static map file.
//! 4. [`ModuleSource::Fm`]: BDFs FM reported (A100-style identity topologies).
//!
//! Rules: within one source, one BDF with two module ids is an error. Across
//! sources, the higher rank wins for a BDF; a disagreeing *ledger* entry is a
//! stale hint and is only reported ([`ModuleMap::superseded`]), while any
//! other disagreement (NVML vs the admin map, FM vs anything) is an error: a
//! wrong map activates the wrong partition and cross-wires tenants (§12.2).
//! After resolution, one module id on two BDFs is an error whatever the
//! sources.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vfio_gpu_host::Bdf;

use crate::types::{ModuleId, PartitionList};

/// Largest admin map file read.
pub const MAX_MAP_FILE_BYTES: u64 = 1 << 20;

/// Where a module id came from; `Ord` is the rank (first = most trusted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ModuleSource {
    /// NVML `nvmlDeviceGetModuleId`, live.
    Nvml,
    /// The ledger's persisted map (hint, re-verified when the GPU is on `nvidia`).
    Ledger,
    /// The admin's static map file.
    AdminMap,
    /// A BDF FM reported for a partition GPU.
    Fm,
}

impl ModuleSource {
    /// Hints lose silently (with a note) to a better source.
    pub fn is_hint(self) -> bool {
        self == ModuleSource::Ledger
    }
}

/// A resolved entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleEntry {
    /// The module id.
    pub module: ModuleId,
    /// Its source.
    pub source: ModuleSource,
}

/// A lower-ranked claim that lost to a better source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superseded {
    /// The GPU.
    pub bdf: Bdf,
    /// The winning entry.
    pub kept: ModuleEntry,
    /// The losing entry.
    pub dropped: ModuleEntry,
}

/// Why the map cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ModuleMapError {
    /// Module id 0 is NVML's "unknown", never a real module.
    #[error("{from:?} gives {bdf} module id 0 (unknown)")]
    ZeroModule {
        /// The GPU the source gave a module id to.
        bdf: Bdf,
        /// Which source said it (NVML, the admin file, a hint).
        from: ModuleSource,
    },
    /// One source gives one BDF two module ids.
    #[error("{from:?} gives {bdf} two module ids: {a} and {b}")]
    TwoModules {
        /// The GPU the source gave a module id to.
        bdf: Bdf,
        /// Which source said it (NVML, the admin file, a hint).
        from: ModuleSource,
        /// The first module id it gave.
        a: ModuleId,
        /// The second, different module id.
        b: ModuleId,
    },
    /// Two non-hint sources disagree about one BDF.
    #[error("{bdf}: {:?} says module {}, {:?} says module {}", a.source, a.module, b.source, b.module)]
    SourcesDisagree {
        /// The GPU the source gave a module id to.
        bdf: Bdf,
        /// The higher-ranked claim.
        a: ModuleEntry,
        /// The lower-ranked claim.
        b: ModuleEntry,
    },
    /// One module id resolved to two BDFs.
    #[error("module {module} is claimed by {} ({:?}) and {} ({:?})", a.0, a.1, b.0, b.1)]
    TwoBdfs {
        /// The module id claimed twice.
        module: ModuleId,
        /// The first GPU that claims it, with its source.
        a: (Bdf, ModuleSource),
        /// The second GPU that claims it, with its source.
        b: (Bdf, ModuleSource),
    },
    /// The admin map file is unreadable or malformed.
    #[error("module map file {}: {detail}", path.display())]
    BadFile {
        /// The admin's module map file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Collects claims from the sources; [`ModuleMapBuilder::build`] resolves them.
#[derive(Clone, Debug, Default)]
pub struct ModuleMapBuilder {
    claims: BTreeMap<Bdf, BTreeMap<ModuleSource, ModuleId>>,
}

impl ModuleMapBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one claim.
    pub fn add(
        &mut self,
        source: ModuleSource,
        bdf: Bdf,
        module: ModuleId,
    ) -> Result<&mut Self, ModuleMapError> {
        if module.0 == 0 {
            return Err(ModuleMapError::ZeroModule { bdf, from: source });
        }
        let per = self.claims.entry(bdf).or_default();
        match per.get(&source) {
            Some(&a) if a != module => Err(ModuleMapError::TwoModules {
                bdf,
                from: source,
                a,
                b: module,
            }),
            _ => {
                per.insert(source, module);
                Ok(self)
            }
        }
    }

    /// Adds the admin map: a JSON object `{"0000:1b:00.0": 5, ...}`.
    pub fn add_admin_map(&mut self, path: &Path, text: &str) -> Result<&mut Self, ModuleMapError> {
        let bad = |detail: String| ModuleMapError::BadFile {
            path: path.to_path_buf(),
            detail,
        };
        let map: BTreeMap<String, u32> = serde_json::from_str(text)
            .map_err(|e| bad(format!("expected {{\"<BDF>\": <module id>}}: {e}")))?;
        for (k, v) in map {
            let bdf: Bdf = k.parse().map_err(|e| bad(format!("{e}")))?;
            self.add(ModuleSource::AdminMap, bdf, ModuleId(v))?;
        }
        Ok(self)
    }

    /// Reads and adds the admin map file (at most [`MAX_MAP_FILE_BYTES`]).
    pub fn add_admin_map_file(&mut self, path: &Path) -> Result<&mut Self, ModuleMapError> {
        let bad = |detail: String| ModuleMapError::BadFile {
            path: path.to_path_buf(),
            detail,
        };
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_MAP_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?;
        if text.len() as u64 > MAX_MAP_FILE_BYTES {
            return Err(bad(format!("larger than {MAX_MAP_FILE_BYTES} bytes")));
        }
        self.add_admin_map(path, &text)
    }

    /// Adds the BDFs FM reported; entries with an empty or all-zero BDF
    /// (H100+) are absent. Returns how many were added.
    pub fn add_fm_list(&mut self, list: &PartitionList) -> Result<usize, ModuleMapError> {
        let mut n = 0;
        for gpu in list.partitions.iter().flat_map(|p| &p.gpus) {
            if let Some(bdf) = parse_fm_bdf(&gpu.pci_bus_id) {
                self.add(ModuleSource::Fm, bdf, gpu.physical_id)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Resolves the claims (see the module docs for the rules).
    pub fn build(&self) -> Result<ModuleMap, ModuleMapError> {
        let mut by_bdf = BTreeMap::new();
        let mut superseded = Vec::new();
        for (&bdf, per) in &self.claims {
            let mut it = per
                .iter()
                .map(|(&source, &module)| ModuleEntry { module, source });
            let Some(best) = it.next() else { continue };
            for other in it {
                if other.module == best.module {
                    continue;
                }
                if other.source.is_hint() {
                    superseded.push(Superseded {
                        bdf,
                        kept: best,
                        dropped: other,
                    });
                } else {
                    return Err(ModuleMapError::SourcesDisagree {
                        bdf,
                        a: best,
                        b: other,
                    });
                }
            }
            by_bdf.insert(bdf, best);
        }
        let mut by_module: BTreeMap<ModuleId, Bdf> = BTreeMap::new();
        for (&bdf, e) in &by_bdf {
            if let Some(&prev) = by_module.get(&e.module) {
                let prev_source = by_bdf.get(&prev).map_or(e.source, |p| p.source);
                return Err(ModuleMapError::TwoBdfs {
                    module: e.module,
                    a: (prev, prev_source),
                    b: (bdf, e.source),
                });
            }
            by_module.insert(e.module, bdf);
        }
        Ok(ModuleMap {
            by_bdf,
            by_module,
            superseded,
        })
    }
}

/// A resolved, one-to-one module id ↔ BDF map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleMap {
    by_bdf: BTreeMap<Bdf, ModuleEntry>,
    by_module: BTreeMap<ModuleId, Bdf>,
    superseded: Vec<Superseded>,
}

impl ModuleMap {
    /// The module id of a GPU.
    pub fn module_of(&self, bdf: Bdf) -> Option<ModuleEntry> {
        self.by_bdf.get(&bdf).copied()
    }

    /// The GPU with a module id.
    pub fn bdf_of(&self, module: ModuleId) -> Option<Bdf> {
        self.by_module.get(&module).copied()
    }

    /// The module ids of a claim's GPUs, or the GPUs without one.
    pub fn modules_of(&self, bdfs: &[Bdf]) -> Result<BTreeSet<ModuleId>, Vec<Bdf>> {
        let missing: Vec<Bdf> = bdfs
            .iter()
            .copied()
            .filter(|b| !self.by_bdf.contains_key(b))
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        Ok(bdfs
            .iter()
            .filter_map(|b| self.by_bdf.get(b).map(|e| e.module))
            .collect())
    }

    /// Every entry, by BDF.
    pub fn entries(&self) -> impl Iterator<Item = (Bdf, ModuleEntry)> + '_ {
        self.by_bdf.iter().map(|(b, e)| (*b, *e))
    }

    /// Number of GPUs mapped.
    pub fn len(&self) -> usize {
        self.by_bdf.len()
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.by_bdf.is_empty()
    }

    /// Ledger hints that lost to a better source (log them).
    pub fn superseded(&self) -> &[Superseded] {
        &self.superseded
    }
}

/// Parses a BDF as FM or NVML prints it (`00000000:1b:00.0`, 8-digit domain,
/// or the 4-digit form); `None` for empty, malformed or all-zero (= absent).
pub fn parse_fm_bdf(s: &str) -> Option<Bdf> {
    let s = s.trim();
    let (domain, rest) = s.split_once(':')?;
    if domain.is_empty() || domain.len() > 8 || !domain.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let domain = u16::try_from(u32::from_str_radix(domain, 16).ok()?).ok()?;
    let bdf: Bdf = format!("{domain:04x}:{}", rest.to_ascii_lowercase())
        .parse()
        .ok()?;
    (bdf != Bdf::new(0, 0, 0, 0)?).then_some(bdf)
}
