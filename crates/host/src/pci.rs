use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{Bdf, DriverName, GpuSelector, HostError, HostRoot};

/// The identity the kernel matches driver ID tables against
/// (`pci_match_one_id`): vendor, device, subsystem ids and the 24-bit class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PciIdentity {
    /// `vendor`, e.g. 0x10de.
    #[serde(serialize_with = "hex4")]
    pub vendor: u16,
    /// `device`, e.g. 0x2330.
    #[serde(serialize_with = "hex4")]
    pub device: u16,
    /// `subsystem_vendor`.
    #[serde(serialize_with = "hex4")]
    pub subsystem_vendor: u16,
    /// `subsystem_device`.
    #[serde(serialize_with = "hex4")]
    pub subsystem_device: u16,
    /// `class`: base, sub-class and programming interface, e.g. 0x030200.
    #[serde(serialize_with = "hex6")]
    pub class: u32,
}

pub(crate) fn hex4<S: serde::Serializer>(v: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("0x{v:04x}"))
}
fn hex6<S: serde::Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("0x{v:06x}"))
}

impl PciIdentity {
    /// `vvvv:dddd`, the form `lspci -n` and `vfio-pci.ids` use.
    pub fn vendor_device(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.device)
    }
}

/// One PCI function as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PciFunction {
    /// Address.
    #[serde(rename = "pciBusID")]
    pub bdf: Bdf,
    /// Vendor, device, subsystem and class.
    #[serde(flatten)]
    pub identity: PciIdentity,
    /// `revision`.
    pub revision: u8,
    /// The bound driver (`driver` link); `None` when unbound, a legitimate state.
    pub driver: Option<DriverName>,
    /// `driver_override`; `None` when it reads `(null)` (unset) or is absent.
    pub driver_override: Option<String>,
    /// IOMMU group number (`iommu_group` link); `None` without an IOMMU.
    pub iommu_group: Option<u32>,
    /// NUMA node; `None` when the kernel reports -1.
    pub numa_node: Option<u32>,
    /// `pciDDDD:BB`, the root complex this function hangs under.
    pub pcie_root: Option<String>,
    /// `sriov_totalvfs`, for SR-IOV capable functions.
    pub sriov_total_vfs: Option<u32>,
    /// `sriov_numvfs`: VFs currently enabled.
    pub sriov_num_vfs: Option<u32>,
    /// A virtual function (has a `physfn` link).
    pub is_virtual_function: bool,
    /// A bridge (has a `pci_bus` directory or a bridge class); never bound to vfio.
    pub is_bridge: bool,
    /// `vfio-dev/vfioN` when bound to a vfio driver (kernel ≥ 6.1).
    pub vfio_dev: Option<String>,
    /// `modalias`, used to pick a vfio variant driver.
    pub modalias: Option<String>,
    /// Total size of the memory BARs, in bytes (from `resource`).
    pub bar_bytes: u64,
    /// Total size of the 64-bit prefetchable memory BARs, in bytes: what a
    /// guest firmware must fit in its 64-bit MMIO window (OVMF's
    /// `X-PciMmio64Mb`) for the VM to boot with this device.
    pub bar_prefetchable64_bytes: u64,
    /// An NVLink management bridge (`SW_MNG` in its VPD, see
    /// [`crate::vpd`]): the Fabric Manager's, never handed out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nvlink_management: bool,
}

impl PciFunction {
    /// Reads every attribute of one function.
    pub fn read(root: &HostRoot, bdf: Bdf) -> Result<Self, HostError> {
        let dir = root.pci_device_dir(&bdf);
        let attr = |name: &str| root.read_opt(&dir.join(name));
        let identity = PciIdentity {
            vendor: hex_attr(&dir.join("vendor"), attr("vendor")?, 0xffff)? as u16,
            device: hex_attr(&dir.join("device"), attr("device")?, 0xffff)? as u16,
            subsystem_vendor: opt_hex(&dir.join("subsystem_vendor"), attr("subsystem_vendor")?)?
                .unwrap_or(0) as u16,
            subsystem_device: opt_hex(&dir.join("subsystem_device"), attr("subsystem_device")?)?
                .unwrap_or(0) as u16,
            class: hex_attr(&dir.join("class"), attr("class")?, 0xff_ffff)?,
        };
        let revision = opt_hex(&dir.join("revision"), attr("revision")?)?.unwrap_or(0) as u8;
        let driver = match root.link_name(&dir.join("driver"))? {
            Some(name) => Some(DriverName::new(&name)?),
            None => None,
        };
        let driver_override = attr("driver_override")?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "(null)");
        let iommu_group = match root.link_name(&dir.join("iommu_group"))? {
            Some(n) => Some(n.parse::<u32>().map_err(|_| HostError::Parse {
                path: dir.join("iommu_group"),
                content: n.chars().take(32).collect(),
                reason: "IOMMU group link does not end in a number",
            })?),
            None => None,
        };
        let numa_node = match attr("numa_node")? {
            Some(s) => match s.trim().parse::<i64>() {
                Ok(n) if n >= 0 => u32::try_from(n).ok(),
                Ok(_) => None,
                Err(_) => {
                    return Err(HostError::Parse {
                        path: dir.join("numa_node"),
                        content: s.chars().take(32).collect(),
                        reason: "not an integer",
                    });
                }
            },
            None => None,
        };
        let dec = |name: &str| -> Result<Option<u32>, HostError> {
            match attr(name)? {
                Some(s) => s
                    .trim()
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| HostError::Parse {
                        path: dir.join(name),
                        content: s.chars().take(32).collect(),
                        reason: "not a decimal count",
                    }),
                None => Ok(None),
            }
        };
        let sriov_total_vfs = dec("sriov_totalvfs")?;
        let sriov_num_vfs = dec("sriov_numvfs")?;
        let is_virtual_function = root.exists(&dir.join("physfn"))?;
        let base_sub = identity.class >> 8;
        let is_bridge =
            root.exists(&dir.join("pci_bus"))? || base_sub == 0x0604 || base_sub == 0x0609;
        let vfio_dev = first_entry(root, &dir.join("vfio-dev"))?;
        let modalias = attr("modalias")?;
        let (bar_bytes, bar_prefetchable64_bytes) = match attr("resource")? {
            Some(text) => (bar_bytes(&text), bar_prefetchable64_bytes(&text)),
            None => (0, 0),
        };
        let pcie_root = pcie_root(root, &bdf);
        let nvlink_management = identity.vendor == crate::vpd::NVLINK_MANAGEMENT_VENDOR
            && nvlink_management(root, &dir.join("vpd"));
        Ok(PciFunction {
            bdf,
            identity,
            revision,
            driver,
            driver_override,
            iommu_group,
            numa_node,
            pcie_root,
            sriov_total_vfs,
            sriov_num_vfs,
            is_virtual_function,
            is_bridge,
            vfio_dev,
            modalias,
            bar_bytes,
            bar_prefetchable64_bytes,
            nvlink_management,
        })
    }

    /// True when bound to a vfio driver: vfio-pci, a variant named as such,
    /// or any driver that registered the device with vfio (the kernel's
    /// `vfio-dev/vfioN` class device, with `CONFIG_VFIO_DEVICE_CDEV`).
    pub fn on_vfio(&self) -> bool {
        bound_to_vfio(self.driver.as_ref(), self.vfio_dev.as_deref())
    }
}

/// Whether the VPD at `path` marks an NVLink management bridge. A VPD that
/// cannot be read (devices without VPD answer EIO) counts as no mark: NVIDIA's
/// tools would not recognise such a function as a management bridge either.
fn nvlink_management(root: &HostRoot, path: &Path) -> bool {
    match root.read_bytes_limited(path, crate::vpd::MAX_VPD_BYTES as u64) {
        Ok(Some(bytes)) => crate::vpd::vpd_marks_nvlink_management(&bytes),
        Ok(None) | Err(_) => false,
    }
}

fn first_entry(root: &HostRoot, dir: &Path) -> Result<Option<String>, HostError> {
    match root.read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vfio"))
                .collect();
            names.sort();
            Ok(names.into_iter().next())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HostError::io(dir, e)),
    }
}

/// `(bus, devfn)` of every function whose vendor is in `vendors`, from
/// `proc/bus/pci/devices` (`BBDF\tVVVVDDDD\t…` per line); `None` when the
/// file is missing or unreadable, so the caller falls back to sysfs.
fn proc_bus_candidates(
    root: &HostRoot,
    vendors: &[u16],
) -> Option<std::collections::HashSet<(u8, u8)>> {
    let text = root
        .read_limited(&root.rel("proc/bus/pci/devices"), 4 << 20)
        .ok()??;
    let mut out = std::collections::HashSet::new();
    for line in text.lines() {
        let mut fields = line.split('\t');
        let (Some(bdf), Some(ids)) = (fields.next(), fields.next()) else {
            return None;
        };
        let (Ok(bdf), Ok(ids)) = (
            u16::from_str_radix(bdf.trim(), 16),
            u32::from_str_radix(ids.trim(), 16),
        ) else {
            // An unexpected format: do not trust the file at all.
            return None;
        };
        let vendor = (ids >> 16) as u16;
        if vendors.contains(&vendor) {
            out.insert(((bdf >> 8) as u8, (bdf & 0xff) as u8));
        }
    }
    Some(out)
}

/// Reads a small hex attribute with one `read(2)`: the pre-filter runs on
/// every function of the host, so it avoids the extra syscalls of
/// `read_to_string` (size probe, second read for EOF).
fn read_hex_fast(root: &HostRoot, path: &Path) -> Option<u32> {
    use std::io::Read;
    let mut f = root.open_file(path).ok()?;
    let mut buf = [0u8; 32];
    let n = f.read(&mut buf).ok()?;
    parse_hex(std::str::from_utf8(&buf[..n]).ok()?)
}

/// Parses `0x10de`-style sysfs hex.
pub(crate) fn parse_hex(s: &str) -> Option<u32> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() || t.len() > 8 {
        return None;
    }
    u32::from_str_radix(t, 16).ok()
}

fn opt_hex(path: &Path, v: Option<String>) -> Result<Option<u32>, HostError> {
    match v {
        None => Ok(None),
        Some(s) => parse_hex(&s).map(Some).ok_or_else(|| HostError::Parse {
            path: path.to_path_buf(),
            content: s.chars().take(32).collect(),
            reason: "not a hex number",
        }),
    }
}

fn hex_attr(path: &Path, v: Option<String>, max: u32) -> Result<u32, HostError> {
    let n = opt_hex(path, v)?.ok_or_else(|| HostError::Parse {
        path: path.to_path_buf(),
        content: String::new(),
        reason: "missing",
    })?;
    if n > max {
        return Err(HostError::Parse {
            path: path.to_path_buf(),
            content: format!("{n:#x}"),
            reason: "out of range",
        });
    }
    Ok(n)
}

/// `IORESOURCE_MEM` in a `resource` line's flags.
const IORESOURCE_MEM: u64 = 0x200;
/// `IORESOURCE_PREFETCH`.
const IORESOURCE_PREFETCH: u64 = 0x2000;
/// `IORESOURCE_MEM_64`.
const IORESOURCE_MEM_64: u64 = 0x10_0000;

/// Sums the memory BARs (lines 0–5 of `resource`, flag IORESOURCE_MEM).
fn bar_bytes(text: &str) -> u64 {
    bars_with_flags(text, IORESOURCE_MEM)
}

/// Sums the 64-bit prefetchable memory BARs (lines 0–5 of `resource`).
fn bar_prefetchable64_bytes(text: &str) -> u64 {
    bars_with_flags(
        text,
        IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64,
    )
}

/// Sums the sizes of the BARs (lines 0–5 of `resource`) whose flags hold
/// all of `want`.
fn bars_with_flags(text: &str, want: u64) -> u64 {
    text.lines()
        .take(6)
        .filter_map(|line| {
            let mut it = line.split_whitespace().map(|f| {
                let f = f.strip_prefix("0x").unwrap_or(f);
                u64::from_str_radix(f, 16).ok()
            });
            let (start, end, flags) = (it.next()??, it.next()??, it.next()??);
            // A resource file is host input: a full-range BAR must not overflow.
            (flags & want == want && end > start).then(|| (end - start).saturating_add(1))
        })
        .fold(0u64, |a, b| a.saturating_add(b))
}

/// `pciDDDD:BB` from the resolved device path: the first component under
/// `sys/devices`. Read from the `bus/pci/devices` link's own text (one
/// `readlink`, `../../../devices/pciDDDD:BB/...`) where it has that form;
/// otherwise resolved in full (a `realpath` costs a `readlink` per component,
/// and a move reads its functions a dozen times).
fn pcie_root(root: &HostRoot, bdf: &Bdf) -> Option<String> {
    if let Ok(link) = root.read_link(&root.pci_device_dir(bdf)) {
        let mut parts = link.components().map(|c| c.as_os_str().to_string_lossy());
        if parts.any(|c| c == "devices")
            && let Some(first) = parts.next()
            && first.starts_with("pci")
        {
            return Some(first.into_owned());
        }
    }
    let resolved = root.canonicalize(&root.pci_device_dir(bdf)).ok()?;
    let devices = root.canonicalize(&root.rel("sys/devices")).ok()?;
    let first = resolved.strip_prefix(&devices).ok()?.components().next()?;
    let name = first.as_os_str().to_string_lossy().into_owned();
    name.starts_with("pci").then_some(name)
}

/// Where a function is bound right now: the three attributes a bind or
/// unbind changes, read without the rest of [`PciFunction`] (cheap enough to
/// verify after every write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The bound driver, if any.
    pub driver: Option<DriverName>,
    /// `driver_override`, `None` when unset.
    pub driver_override: Option<String>,
    /// `vfio-dev/vfioN` while on a vfio driver.
    pub vfio_dev: Option<String>,
}

impl Binding {
    /// Reads the binding of `bdf`.
    pub fn read(root: &HostRoot, bdf: Bdf) -> Result<Self, HostError> {
        let dir = root.pci_device_dir(&bdf);
        let driver = match root.link_name(&dir.join("driver"))? {
            Some(name) => Some(DriverName::new(&name)?),
            None => None,
        };
        let driver_override = root
            .read_opt(&dir.join("driver_override"))?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "(null)");
        let vfio_dev = match &driver {
            Some(_) => first_entry(root, &dir.join("vfio-dev"))?,
            None => None,
        };
        Ok(Binding {
            driver,
            driver_override,
            vfio_dev,
        })
    }

    /// True when bound to a vfio driver (see [`PciFunction::on_vfio`]).
    pub fn on_vfio(&self) -> bool {
        bound_to_vfio(self.driver.as_ref(), self.vfio_dev.as_deref())
    }
}

/// A bound driver is a vfio driver by its name, or, whatever its name, when
/// the device has a `vfio-dev/` class device.
fn bound_to_vfio(driver: Option<&DriverName>, vfio_dev: Option<&str>) -> bool {
    driver.is_some_and(|d| d.is_vfio() || vfio_dev.is_some())
}

/// The PCI view of a host: every function's address, full attributes for the
/// functions that matter (GPU candidates, their IOMMU group members and slot
/// siblings), and those IOMMU groups.
#[derive(Clone, Debug)]
pub struct PciHost {
    root: HostRoot,
    addresses: Vec<Bdf>,
    functions: BTreeMap<Bdf, PciFunction>,
    groups: BTreeMap<u32, Vec<Bdf>>,
    iommu_present: bool,
    problems: Vec<String>,
}

/// Reads one function fully (see [`PciFunction::read`]).
pub type FunctionReader<'a> = dyn Fn(Bdf) -> Result<PciFunction, HostError> + 'a;

impl PciHost {
    /// Scans `sys/bus/pci/devices` under `root`.
    ///
    /// Cheap on hosts with thousands of functions: only `vendor` (and `class`
    /// when the selector needs it) is read for functions that cannot be GPUs.
    pub fn scan(root: &HostRoot, selector: &GpuSelector) -> Result<Self, HostError> {
        PciHost::scan_with(root, selector, &|b| PciFunction::read(root, b))
    }

    /// Like [`PciHost::scan`], with every full function read made by `read`
    /// (the engine bounds reads that can block on a device lock).
    pub fn scan_with(
        root: &HostRoot,
        selector: &GpuSelector,
        read: &FunctionReader<'_>,
    ) -> Result<Self, HostError> {
        let dir = root.pci_devices_dir();
        let entries = root.read_dir(&dir).map_err(|e| HostError::io(&dir, e))?;
        let mut addresses = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| HostError::io(&dir, e))?;
            // Entries that are not addresses are ignored: sysfs only holds addresses.
            if let Ok(bdf) = entry.file_name().to_string_lossy().parse::<Bdf>() {
                addresses.push(bdf);
            }
        }
        addresses.sort();
        let mut host = PciHost {
            root: root.clone(),
            addresses,
            functions: BTreeMap::new(),
            groups: BTreeMap::new(),
            iommu_present: false,
            problems: Vec::new(),
        };
        host.iommu_present = root
            .read_dir(&root.iommu_groups_dir())
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);

        // One read of /proc/bus/pci/devices replaces thousands of `vendor`
        // reads when the selector is vendor-based; it has no PCI domain, so it
        // can only narrow the candidates, never decide alone.
        let by_vendor = selector
            .vendors()
            .and_then(|vendors| proc_bus_candidates(root, &vendors));
        let mut wanted = Vec::new();
        for bdf in &host.addresses {
            if let Some(slots) = &by_vendor
                && !slots.contains(&(bdf.bus(), (bdf.device() << 3) | bdf.function()))
            {
                continue;
            }
            if selector.needs_full_read(|attr| read_hex_fast(root, &root.pci_attr(bdf, attr))) {
                wanted.push(*bdf);
            }
        }
        for bdf in wanted {
            // One unreadable function must not hide every other GPU: report and skip it.
            let f = match read(bdf) {
                Ok(f) => f,
                Err(e) => {
                    host.problems.push(format!("{bdf} skipped: {e}"));
                    continue;
                }
            };
            if !selector.matches(&f) {
                continue;
            }
            host.load_related(&f, read)?;
            host.functions.insert(bdf, f);
        }
        Ok(host)
    }

    /// Reads one GPU candidate and its relatives only (its slot siblings and
    /// IOMMU group), without listing the whole bus: the engine's view of one
    /// GPU right before it acts on it.
    pub fn scan_one(root: &HostRoot, selector: &GpuSelector, bdf: Bdf) -> Result<Self, HostError> {
        PciHost::scan_one_with(root, selector, bdf, &|b| PciFunction::read(root, b))
    }

    /// Like [`PciHost::scan_one`], with every function read made by `read`.
    pub fn scan_one_with(
        root: &HostRoot,
        selector: &GpuSelector,
        bdf: Bdf,
        read: &FunctionReader<'_>,
    ) -> Result<Self, HostError> {
        let mut host = PciHost {
            root: root.clone(),
            addresses: Vec::new(),
            functions: BTreeMap::new(),
            groups: BTreeMap::new(),
            iommu_present: root
                .read_dir(&root.iommu_groups_dir())
                .map(|mut d| d.next().is_some())
                .unwrap_or(false),
            problems: Vec::new(),
        };
        for func in 0..8 {
            if let Some(sibling) = Bdf::new(bdf.domain(), bdf.bus(), bdf.device(), func)
                && root.exists(&root.pci_device_dir(&sibling))?
            {
                host.addresses.push(sibling);
            }
        }
        if !host.addresses.contains(&bdf) {
            return Ok(host);
        }
        let f = read(bdf)?;
        if selector.matches(&f) {
            host.load_related(&f, read)?;
            host.functions.insert(bdf, f);
        }
        Ok(host)
    }

    /// Loads the IOMMU group and slot siblings of a GPU candidate.
    fn load_related(
        &mut self,
        f: &PciFunction,
        read: &FunctionReader<'_>,
    ) -> Result<(), HostError> {
        let mut related: Vec<Bdf> = self
            .addresses
            .iter()
            .filter(|b| b.same_slot(&f.bdf) && **b != f.bdf)
            .copied()
            .collect();
        if let Some(group) = f.iommu_group {
            let members = self.read_group(group)?;
            related.extend(members.iter().copied().filter(|b| *b != f.bdf));
            self.groups.insert(group, members);
        }
        for bdf in related {
            if self.functions.contains_key(&bdf) {
                continue;
            }
            let rf = match read(bdf) {
                Ok(rf) => rf,
                Err(e) => {
                    self.problems
                        .push(format!("{bdf} (related to {}) skipped: {e}", f.bdf));
                    continue;
                }
            };
            if let Some(g) = rf.iommu_group
                && !self.groups.contains_key(&g)
            {
                let members = self.read_group(g)?;
                self.groups.insert(g, members);
            }
            self.functions.insert(bdf, rf);
        }
        Ok(())
    }

    fn read_group(&self, group: u32) -> Result<Vec<Bdf>, HostError> {
        let dir = self.root.iommu_group_devices_dir(group);
        let mut members = Vec::new();
        match self.root.read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(|err| HostError::io(&dir, err))?;
                    if let Ok(b) = e.file_name().to_string_lossy().parse::<Bdf>() {
                        members.push(b);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(HostError::io(&dir, e)),
        }
        members.sort();
        Ok(members)
    }

    /// Functions that could not be read, with the reason. They are left out
    /// of the model; callers should show these to the admin.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
    /// The host root this view was read from.
    pub fn root(&self) -> &HostRoot {
        &self.root
    }
    /// Every PCI address on the host, sorted.
    pub fn addresses(&self) -> &[Bdf] {
        &self.addresses
    }
    /// A fully read function (GPU candidates and their relatives).
    pub fn function(&self, bdf: &Bdf) -> Option<&PciFunction> {
        self.functions.get(bdf)
    }
    /// All fully read functions.
    pub fn functions(&self) -> impl Iterator<Item = &PciFunction> {
        self.functions.values()
    }
    /// Members of an IOMMU group (bridges included), if the group was read.
    pub fn group_members(&self, group: u32) -> Option<&[Bdf]> {
        self.groups.get(&group).map(|v| v.as_slice())
    }
    /// True when `sys/kernel/iommu_groups` has at least one group.
    pub fn iommu_present(&self) -> bool {
        self.iommu_present
    }
    /// Directory of the device, for diagnostics.
    pub fn device_dir(&self, bdf: &Bdf) -> PathBuf {
        self.root.pci_device_dir(bdf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizes_from_resource() {
        // BAR0 16 MiB mem, BAR1 unused, BAR2 256 GiB mem 64-bit prefetch, an I/O BAR.
        let text = "0x0000104002000000 0x0000104002ffffff 0x0000000000040200\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000100000000000 0x0000103fffffffff 0x000000000014220c\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x000000000000e000 0x000000000000e07f 0x0000000000040101\n";
        assert_eq!(bar_bytes(text), (16 << 20) + (256u64 << 30));
        assert_eq!(bar_prefetchable64_bytes(text), 256u64 << 30);
        assert_eq!(bar_bytes("garbage\n\n"), 0);
        assert_eq!(bar_prefetchable64_bytes("garbage\n\n"), 0);
        // 64-bit but not prefetchable, prefetchable but 32-bit: neither counts.
        let other = "0x0 0xffffff 0x140200\n0x0 0xffffff 0x42208\n";
        assert_eq!(bar_bytes(other), 2 << 24);
        assert_eq!(bar_prefetchable64_bytes(other), 0);
        // A BAR spanning the whole address space saturates instead of panicking.
        assert_eq!(
            bar_bytes("0x0 0xffffffffffffffff 0x200\n0x0 0xffffffffffffffff 0x200\n"),
            u64::MAX
        );
    }

    #[test]
    fn hex_forms() {
        assert_eq!(parse_hex("0x10de\n"), Some(0x10de));
        assert_eq!(parse_hex("10DE"), Some(0x10de));
        assert_eq!(parse_hex(""), None);
        assert_eq!(parse_hex("0x"), None);
        assert_eq!(parse_hex("zz"), None);
    }
}
