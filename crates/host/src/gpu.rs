use serde::Serialize;

use crate::pci::parse_hex;
use crate::{Bdf, DriverName, HostError, PciFunction, PciHost, PciIdentity, PciIdsDb};

/// One rule of the GPU selector: vendor, device and masked class, each optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMatch {
    /// Vendor id, or any.
    pub vendor: Option<u16>,
    /// Device id, or any.
    pub device: Option<u16>,
    /// `(class, mask)`: matches when `(dev.class ^ class) & mask == 0`.
    pub class: Option<(u32, u32)>,
}

impl IdMatch {
    /// Parses `VVVV:DDDD`, `VVVV:*` or `VVVV` (hex, optional `0x`).
    pub fn parse_id(s: &str) -> Result<Self, HostError> {
        let bad = || HostError::Parse {
            path: "--gpu-id".into(),
            content: s.chars().take(32).collect(),
            reason: "expected VVVV:DDDD, VVVV:* or VVVV in hex",
        };
        let (v, d) = match s.split_once(':') {
            Some((v, d)) => (v, Some(d)),
            None => (s, None),
        };
        let vendor = parse_hex(v).filter(|x| *x <= 0xffff).ok_or_else(bad)? as u16;
        let device = match d {
            None | Some("*") => None,
            Some(d) => Some(parse_hex(d).filter(|x| *x <= 0xffff).ok_or_else(bad)? as u16),
        };
        Ok(IdMatch {
            vendor: Some(vendor),
            device,
            class: None,
        })
    }

    /// Parses a class rule `0xCCSSPP[/0xMASK]` (mask defaults to 0xffff00,
    /// i.e. base class and sub-class).
    pub fn parse_class(s: &str) -> Result<Self, HostError> {
        let bad = || HostError::Parse {
            path: "--gpu-class".into(),
            content: s.chars().take(32).collect(),
            reason: "expected 0xCCSSPP or 0xCCSSPP/0xMASK in hex",
        };
        let (c, m) = match s.split_once('/') {
            Some((c, m)) => (c, Some(m)),
            None => (s, None),
        };
        let class = parse_hex(c).filter(|x| *x <= 0xff_ffff).ok_or_else(bad)?;
        let mask = match m {
            Some(m) => parse_hex(m).filter(|x| *x <= 0xff_ffff).ok_or_else(bad)?,
            None => 0xff_ff00,
        };
        Ok(IdMatch {
            vendor: None,
            device: None,
            class: Some((class, mask)),
        })
    }

    fn matches(&self, id: &PciIdentity) -> bool {
        self.vendor.is_none_or(|v| v == id.vendor)
            && self.device.is_none_or(|d| d == id.device)
            && self.class.is_none_or(|(c, m)| (id.class ^ c) & m == 0)
    }
}

/// Decides which PCI functions are GPUs this driver manages.
///
/// The default takes NVIDIA (0x10de) display (0x0300xx) and 3D (0x0302xx)
/// controllers, physical functions only. Rules are OR-ed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuSelector {
    /// Any matching rule selects the function.
    pub rules: Vec<IdMatch>,
    /// Also select SR-IOV virtual functions (off by default: whole GPUs only).
    pub include_virtual_functions: bool,
}

impl Default for GpuSelector {
    fn default() -> Self {
        let nvidia = |class| IdMatch {
            vendor: Some(0x10de),
            device: None,
            class: Some((class, 0xff_ff00)),
        };
        GpuSelector {
            rules: vec![nvidia(0x03_0000), nvidia(0x03_0200)],
            include_virtual_functions: false,
        }
    }
}

impl GpuSelector {
    /// A selector from explicit rules (e.g. `--gpu-id 1002:74a1`).
    pub fn from_rules(rules: Vec<IdMatch>) -> Self {
        GpuSelector {
            rules,
            include_virtual_functions: false,
        }
    }

    /// True if the function matches a rule and is a physical function (unless
    /// VFs are included). Bridges are never GPUs.
    pub fn matches(&self, f: &PciFunction) -> bool {
        (self.include_virtual_functions || !f.is_virtual_function)
            && !f.is_bridge
            && !is_fabric_function(f)
            && self.rules.iter().any(|r| r.matches(&f.identity))
    }

    /// The vendors the rules are limited to; `None` when some rule takes any vendor.
    pub(crate) fn vendors(&self) -> Option<Vec<u16>> {
        self.rules.iter().map(|r| r.vendor).collect()
    }

    /// Cheap pre-filter during a scan: reads only the attributes the rules
    /// need (`vendor`, then `device`/`class`) through `read`.
    pub(crate) fn needs_full_read(&self, read: impl Fn(&str) -> Option<u32>) -> bool {
        let mut vendor = None;
        let mut device = None;
        let mut class = None;
        self.rules.iter().any(|r| {
            // An unreadable attribute selects the function for a full read,
            // which then reports the problem instead of hiding the device.
            if let Some(v) = r.vendor
                && vendor
                    .get_or_insert_with(|| read("vendor"))
                    .is_some_and(|x| x != u32::from(v))
            {
                return false;
            }
            if let Some(d) = r.device
                && device
                    .get_or_insert_with(|| read("device"))
                    .is_some_and(|x| x != u32::from(d))
            {
                return false;
            }
            if let Some((c, m)) = r.class
                && class
                    .get_or_insert_with(|| read("class"))
                    .is_some_and(|dc| (dc ^ c) & m != 0)
            {
                return false;
            }
            true
        })
    }
}

/// What a function of a GPU's IOMMU group is to that GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FunctionRole {
    /// The GPU function itself.
    Gpu,
    /// A function of the GPU: on its slot, linked as its consumer
    /// (`consumer:pci:<bdf>`), or of its vendor. Moves with the GPU.
    Companion,
    /// A bridge: stays on its driver (pcieport).
    Bridge,
    /// Another GPU the selector also chose that shares the IOMMU group.
    OtherGpu,
    /// An unrelated device (e.g. a NIC behind the same non-ACS switch).
    Foreign,
    /// An NVIDIA NVSwitch (class 0x0680) or an NVLink management bridge
    /// (`SW_MNG` in its VPD): it belongs to the host's Fabric Manager and is
    /// never handed out, so it blocks the move whatever the policy allows.
    NvSwitch,
}

/// An NVIDIA NVSwitch function (vendor 0x10de, PCI class 0x0680 "other
/// bridge"): never a GPU, never moved, never passed through.
pub fn is_fabric_switch(id: &PciIdentity) -> bool {
    id.vendor == 0x10de && id.class >> 8 == 0x0680
}

/// A function of the NVLink fabric: an NVSwitch ([`is_fabric_switch`]) or an
/// NVLink management bridge ([`PciFunction::nvlink_management`]). Never a
/// GPU, never moved, never passed through.
pub fn is_fabric_function(f: &PciFunction) -> bool {
    is_fabric_switch(&f.identity) || f.nvlink_management
}

/// One function of a GPU's IOMMU group, with its role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuFunction {
    /// Address.
    #[serde(rename = "pciBusID")]
    pub bdf: Bdf,
    /// Its role for the GPU.
    pub role: FunctionRole,
    /// Vendor, device, subsystem and class.
    #[serde(flatten)]
    pub identity: PciIdentity,
    /// Bound driver, if any.
    pub driver: Option<DriverName>,
    /// `driver_override`, if set.
    pub driver_override: Option<String>,
    /// Its `vfio-dev/vfioN` class device, when a vfio driver has it.
    #[serde(skip)]
    pub vfio_dev: Option<String>,
}

impl GpuFunction {
    /// True when bound to a vfio driver (see [`PciFunction::on_vfio`]).
    pub fn on_vfio(&self) -> bool {
        self.driver
            .as_ref()
            .is_some_and(|d| d.is_vfio() || self.vfio_dev.is_some())
    }
}

/// A GPU and everything that moves with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    /// The GPU function with all its attributes.
    #[serde(flatten)]
    pub function: PciFunction,
    /// Name from the host's pci.ids, when found.
    pub product_name: Option<String>,
    /// The GPU function first, then its companions: the functions that move
    /// to vfio together.
    pub functions: Vec<GpuFunction>,
    /// Every member of the IOMMU group (bridges, foreign devices included).
    pub iommu_group_members: Vec<GpuFunction>,
    /// Group members that could not be read: nobody knows what they are, so
    /// a move refuses them rather than leave them out unseen (review n13).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_members: Vec<Bdf>,
}

impl Gpu {
    /// The GPU function's address.
    pub fn bdf(&self) -> Bdf {
        self.function.bdf
    }
    /// Members that would block a move to vfio: foreign devices and other GPUs.
    pub fn blocking_members(&self) -> impl Iterator<Item = &GpuFunction> {
        self.iommu_group_members.iter().filter(|m| {
            matches!(
                m.role,
                FunctionRole::Foreign | FunctionRole::OtherGpu | FunctionRole::NvSwitch
            )
        })
    }

    /// NVSwitch functions in the GPU's IOMMU group (see [`FunctionRole::NvSwitch`]).
    pub fn fabric_switch_members(&self) -> impl Iterator<Item = &GpuFunction> {
        self.iommu_group_members
            .iter()
            .filter(|m| m.role == FunctionRole::NvSwitch)
    }
}

/// True when `f` belongs to `gpu` and moves with it: the same slot, or a
/// `consumer:pci:<bdf>` link from the GPU (the kernel's quirk links for
/// audio/USB/UCSI functions). Neither a class nor a vendor proves it:
/// chipset xHCI, HDA or SATA controllers (vendor 8086 beside an Intel GPU)
/// and another NVIDIA GPU share groups on some boards, and the host must
/// keep them (review n6).
fn belongs_to_gpu(host: &PciHost, gpu: &PciFunction, f: &PciFunction) -> bool {
    f.bdf.same_slot(&gpu.bdf)
        || host.root().exists_lossy(
            &host
                .device_dir(&gpu.bdf)
                .join(format!("consumer:pci:{}", f.bdf)),
        )
}

/// Groups each selected GPU with its companion functions and IOMMU group.
pub fn discover_gpus(host: &PciHost, selector: &GpuSelector, ids: Option<&PciIdsDb>) -> Vec<Gpu> {
    let gpus: Vec<&PciFunction> = host.functions().filter(|f| selector.matches(f)).collect();
    let names = ids.map(|db| db.names(gpus.iter().map(|f| (f.identity.vendor, f.identity.device))));
    gpus.iter()
        .map(|gpu| {
            let describe = |f: &PciFunction, role| GpuFunction {
                bdf: f.bdf,
                role,
                identity: f.identity,
                driver: f.driver.clone(),
                driver_override: f.driver_override.clone(),
                vfio_dev: f.vfio_dev.clone(),
            };
            let role_of = |f: &PciFunction| {
                if f.bdf == gpu.bdf {
                    FunctionRole::Gpu
                } else if is_fabric_function(f) {
                    FunctionRole::NvSwitch
                } else if f.is_bridge {
                    FunctionRole::Bridge
                } else if selector.matches(f)
                    || (f.identity.class >> 16 == 0x03 && !f.bdf.same_slot(&gpu.bdf))
                {
                    // A display controller the selector did not pick is still a GPU.
                    FunctionRole::OtherGpu
                } else if belongs_to_gpu(host, gpu, f) {
                    FunctionRole::Companion
                } else {
                    FunctionRole::Foreign
                }
            };
            let members: &[Bdf] = gpu
                .iommu_group
                .and_then(|g| host.group_members(g))
                .unwrap_or(&[]);
            let group: Vec<&PciFunction> =
                members.iter().filter_map(|b| host.function(b)).collect();
            let unreadable_members: Vec<Bdf> = members
                .iter()
                .filter(|b| host.function(b).is_none())
                .copied()
                .collect();
            let iommu_group_members: Vec<GpuFunction> =
                group.iter().map(|f| describe(f, role_of(f))).collect();
            // Without an IOMMU, slot siblings are still the GPU's functions.
            let mut functions = vec![describe(gpu, FunctionRole::Gpu)];
            let mut companions: Vec<&PciFunction> = if gpu.iommu_group.is_some() {
                group
                    .iter()
                    .copied()
                    .filter(|f| role_of(f) == FunctionRole::Companion)
                    .collect()
            } else {
                host.functions()
                    .filter(|f| f.bdf != gpu.bdf && f.bdf.same_slot(&gpu.bdf) && !f.is_bridge)
                    .collect()
            };
            companions.sort_by_key(|f| f.bdf);
            functions.extend(
                companions
                    .iter()
                    .map(|f| describe(f, FunctionRole::Companion)),
            );
            Gpu {
                product_name: names
                    .as_ref()
                    .and_then(|n| n.get(&(gpu.identity.vendor, gpu.identity.device)).cloned()),
                function: (*gpu).clone(),
                functions,
                iommu_group_members,
                unreadable_members,
            }
        })
        .collect()
}
