#![allow(clippy::disallowed_methods)] // builds the simulated host; it is not a read of one
//! Fixture hosts: real directory trees with real symlinks laid out as the
//! kernel lays out sysfs, for tests, benchmarks and the built-in demo host.
//!
//! Not a mock: the host model reads a fixture with exactly the code it uses
//! on a node.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use crate::Bdf;

/// One PCI function to create in a fixture.
#[derive(Clone, Debug)]
pub struct FunctionSpec {
    /// Address.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem device id.
    pub subsystem_device: u16,
    /// 24-bit class.
    pub class: u32,
    /// Revision.
    pub revision: u8,
    /// Bound driver.
    pub driver: Option<String>,
    /// `driver_override` (`None` reads `(null)`).
    pub driver_override: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// NUMA node (-1 = none).
    pub numa_node: i32,
    /// The bridge it sits under; `None` = on the root bus.
    pub parent: Option<Bdf>,
    /// A bridge (gets a `pci_bus` directory).
    pub bridge: bool,
    /// `sriov_totalvfs`/`sriov_numvfs`, when SR-IOV capable.
    pub sriov: Option<(u32, u32)>,
    /// Memory BAR sizes in bytes (BAR0, BAR1, …).
    pub bars: Vec<u64>,
    /// A virtual function of this physical function.
    pub physfn: Option<Bdf>,
    /// The `vpd` attribute's bytes ([`crate::vpd::encode_vpd`] builds one).
    pub vpd: Option<Vec<u8>>,
}

impl FunctionSpec {
    /// A function with the given ids and class, unbound, no IOMMU group.
    pub fn new(bdf: Bdf, vendor: u16, device: u16, class: u32) -> Self {
        FunctionSpec {
            bdf,
            vendor,
            device,
            subsystem_vendor: vendor,
            subsystem_device: 0,
            class,
            revision: 0xa1,
            driver: None,
            driver_override: None,
            iommu_group: None,
            numa_node: -1,
            parent: None,
            bridge: false,
            sriov: None,
            bars: Vec::new(),
            physfn: None,
            vpd: None,
        }
    }

    /// Sets the `vpd` attribute.
    pub fn vpd(mut self, bytes: Vec<u8>) -> Self {
        self.vpd = Some(bytes);
        self
    }
    /// Sets the subsystem ids.
    pub fn subsystem(mut self, vendor: u16, device: u16) -> Self {
        self.subsystem_vendor = vendor;
        self.subsystem_device = device;
        self
    }
    /// Binds it to a driver.
    pub fn driver(mut self, name: &str) -> Self {
        self.driver = Some(name.to_string());
        self
    }
    /// Sets `driver_override`.
    pub fn driver_override(mut self, name: &str) -> Self {
        self.driver_override = Some(name.to_string());
        self
    }
    /// Puts it in an IOMMU group.
    pub fn group(mut self, group: u32) -> Self {
        self.iommu_group = Some(group);
        self
    }
    /// Sets the NUMA node.
    pub fn numa(mut self, node: i32) -> Self {
        self.numa_node = node;
        self
    }
    /// Places it under a bridge.
    pub fn under(mut self, bridge: Bdf) -> Self {
        self.parent = Some(bridge);
        self
    }
    /// Marks it a bridge.
    pub fn bridge(mut self) -> Self {
        self.bridge = true;
        self
    }
    /// Sets memory BAR sizes.
    pub fn bars(mut self, sizes: &[u64]) -> Self {
        self.bars = sizes.to_vec();
        self
    }
    /// Makes it SR-IOV capable with `total` VFs, `enabled` of them on.
    pub fn sriov(mut self, total: u32, enabled: u32) -> Self {
        self.sriov = Some((total, enabled));
        self
    }
}

/// A fixture host tree under a directory.
#[derive(Clone, Debug)]
pub struct FixtureHost {
    root: PathBuf,
    paths: BTreeMap<Bdf, PathBuf>,
}

impl FixtureHost {
    /// Creates the skeleton: `sys/bus/pci/{devices,drivers,drivers_probe}`,
    /// `sys/kernel/iommu_groups`, `sys/devices`, `proc/cmdline`,
    /// `proc/sys/kernel/{osrelease,random/boot_id}`, `dev/vfio`.
    pub fn create(root: &Path) -> io::Result<Self> {
        for d in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/kernel/iommu_groups",
            "sys/devices",
            "proc/sys/kernel/random",
            "dev/vfio",
            "etc",
        ] {
            fs::create_dir_all(root.join(d))?;
        }
        let host = FixtureHost {
            root: root.to_path_buf(),
            paths: BTreeMap::new(),
        };
        host.write("sys/bus/pci/drivers_probe", "")?;
        host.write("proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro\n")?;
        host.write("proc/sys/kernel/osrelease", "6.1.0-fixture\n")?;
        host.write(
            "proc/sys/kernel/random/boot_id",
            "00000000-0000-4000-8000-000000000001\n",
        )?;
        Ok(host)
    }

    /// Re-opens an existing fixture (e.g. for the simulated kernel).
    pub fn open(root: &Path) -> Self {
        FixtureHost {
            root: root.to_path_buf(),
            paths: BTreeMap::new(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a file relative to the root, creating parent directories.
    pub fn write(&self, rel: &str, content: &str) -> io::Result<()> {
        let path = self.root.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(path, content)
    }

    /// Registers a PCI driver (`sys/bus/pci/drivers/<name>` with its control files).
    pub fn add_driver(&self, name: &str) -> io::Result<()> {
        let dir = self.root.join("sys/bus/pci/drivers").join(name);
        fs::create_dir_all(&dir)?;
        for f in ["bind", "unbind", "new_id", "remove_id"] {
            fs::write(dir.join(f), "")?;
        }
        Ok(())
    }

    /// Adds `count` H200-class GPUs (10de:2330) on `nvidia`, one per bus at
    /// 0000:10:00.0, 0000:20:00.0, … each in its own IOMMU group 1, 2, …
    /// (the benchmarks' host), and returns their addresses.
    pub fn add_nvidia_gpus(&mut self, count: u8) -> io::Result<Vec<Bdf>> {
        (0..count)
            .map(|i| {
                let bdf = i
                    .checked_add(1)
                    .and_then(|n| n.checked_mul(0x10))
                    .and_then(|bus| Bdf::new(0, bus, 0, 0))
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "more than 15 GPUs")
                    })?;
                self.add_function(
                    &FunctionSpec::new(bdf, 0x10de, 0x2330, 0x030200)
                        .driver("nvidia")
                        .group(u32::from(i) + 1),
                )?;
                Ok(bdf)
            })
            .collect()
    }

    /// Creates a function: its directory under `sys/devices`, the bus link,
    /// the IOMMU group links and the driver links.
    pub fn add_function(&mut self, spec: &FunctionSpec) -> io::Result<()> {
        let bdf = spec.bdf;
        let parent_dir = match spec.parent {
            Some(p) => self.paths.get(&p).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("parent {p} not created"))
            })?,
            None => self.root.join(format!(
                "sys/devices/pci{:04x}:{:02x}",
                bdf.domain(),
                bdf.bus()
            )),
        };
        let dir = parent_dir.join(bdf.to_string());
        fs::create_dir_all(&dir)?;
        let w = |name: &str, v: String| fs::write(dir.join(name), v);
        w("vendor", format!("0x{:04x}\n", spec.vendor))?;
        w("device", format!("0x{:04x}\n", spec.device))?;
        w(
            "subsystem_vendor",
            format!("0x{:04x}\n", spec.subsystem_vendor),
        )?;
        w(
            "subsystem_device",
            format!("0x{:04x}\n", spec.subsystem_device),
        )?;
        w("class", format!("0x{:06x}\n", spec.class))?;
        w("revision", format!("0x{:02x}\n", spec.revision))?;
        w("numa_node", format!("{}\n", spec.numa_node))?;
        w(
            "driver_override",
            format!("{}\n", spec.driver_override.as_deref().unwrap_or("(null)")),
        )?;
        w(
            "modalias",
            format!(
                "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}\n",
                spec.vendor,
                spec.device,
                spec.subsystem_vendor,
                spec.subsystem_device,
                spec.class >> 16,
                (spec.class >> 8) & 0xff,
                spec.class & 0xff
            ),
        )?;
        let mut resource = String::new();
        let mut base: u64 = 0x1000_0000_0000 + (u64::from(bdf.bus()) << 36);
        for i in 0..7 {
            match spec.bars.get(i) {
                Some(&size) if size > 0 => {
                    resource.push_str(&format!(
                        "0x{:016x} 0x{:016x} 0x{:016x}\n",
                        base,
                        base + size - 1,
                        // BAR0 as a GPU's register space: 32-bit, not
                        // prefetchable; the others 64-bit prefetchable.
                        if i == 0 {
                            0x0004_0200_u64
                        } else {
                            0x0014_220c_u64
                        }
                    ));
                    base += size.next_power_of_two();
                }
                _ => {
                    resource.push_str("0x0000000000000000 0x0000000000000000 0x0000000000000000\n")
                }
            }
        }
        w("resource", resource)?;
        if let Some(vpd) = &spec.vpd {
            fs::write(dir.join("vpd"), vpd)?;
        }
        if let Some((total, num)) = spec.sriov {
            w("sriov_totalvfs", format!("{total}\n"))?;
            w("sriov_numvfs", format!("{num}\n"))?;
        }
        if spec.bridge {
            fs::create_dir_all(dir.join("pci_bus"))?;
        }
        if let Some(pf) = spec.physfn
            && let Some(pf_dir) = self.paths.get(&pf)
        {
            rel_symlink(pf_dir, &dir.join("physfn"))?;
        }
        rel_symlink(
            &dir,
            &self.root.join("sys/bus/pci/devices").join(bdf.to_string()),
        )?;
        if let Some(group) = spec.iommu_group {
            let gdir = self
                .root
                .join("sys/kernel/iommu_groups")
                .join(group.to_string());
            fs::create_dir_all(gdir.join("devices"))?;
            rel_symlink(&gdir, &dir.join("iommu_group"))?;
            rel_symlink(&dir, &gdir.join("devices").join(bdf.to_string()))?;
        }
        self.paths.insert(bdf, dir);
        // The procfs PCI list the kernel keeps beside sysfs (no domain column).
        let mut line = format!(
            "{:02x}{:02x}\t{:04x}{:04x}\t0",
            bdf.bus(),
            (bdf.device() << 3) | bdf.function(),
            spec.vendor,
            spec.device
        );
        for _ in 0..14 {
            line.push_str("\t               0");
        }
        if let Some(d) = &spec.driver {
            line.push('\t');
            line.push_str(d);
        }
        line.push('\n');
        let list = self.root.join("proc/bus/pci/devices");
        fs::create_dir_all(self.root.join("proc/bus/pci"))?;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(list)?;
        std::io::Write::write_all(&mut f, line.as_bytes())?;
        if let Some(driver) = &spec.driver {
            self.add_driver(driver)?;
            self.link_driver(bdf, driver)?;
            if crate::is_vfio_driver(driver) {
                // Bound at boot on a kernel with both interfaces (the simulated
                // kernel's default): the device cdev next to the group node.
                let vfio = self.add_vfio_dev(bdf)?;
                self.write(&format!("dev/vfio/devices/{vfio}"), "")?;
                if let Some(group) = spec.iommu_group {
                    self.write(&format!("dev/vfio/{group}"), "")?;
                }
            }
        }
        Ok(())
    }

    /// Creates `vfio-dev/vfioN` under the device with the lowest free N (the
    /// kernel's class device, present while a vfio driver is bound) and
    /// returns its name. The class link is created first and claims N: binds
    /// on several threads never get the same N (the kernel's minors are
    /// allocated atomically too).
    pub fn add_vfio_dev(&self, bdf: Bdf) -> io::Result<String> {
        let class_dir = self.root.join("sys/class/vfio-dev");
        fs::create_dir_all(&class_dir)?;
        let device_dir = self.device_dir(bdf)?;
        let mut n = 0;
        loop {
            let name = format!("vfio{n}");
            let link = class_dir.join(&name);
            if fs::symlink_metadata(&link).is_ok() {
                n += 1;
                continue;
            }
            let dir = device_dir.join("vfio-dev").join(&name);
            // Not rel_symlink: it replaces a link, and this must not.
            match symlink(relative_target(&dir, &link)?, &link) {
                Ok(()) => {
                    fs::create_dir_all(&dir)?;
                    return Ok(name);
                }
                // Another bind took this N between the look and the link.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the device's `vfio-dev/vfioN` (on unbind from a vfio driver).
    pub fn remove_vfio_dev(&self, bdf: Bdf) -> io::Result<()> {
        let dir = self.device_dir(bdf)?.join("vfio-dev");
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                // A fixture that never made the class link: nothing to remove.
                let _ = fs::remove_file(self.root.join("sys/class/vfio-dev").join(e.file_name()));
            }
        }
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Binds `bdf` to `driver` in the tree: the device's `driver` link and the
    /// driver's `<BDF>` link, as the driver core does.
    pub fn link_driver(&self, bdf: Bdf, driver: &str) -> io::Result<()> {
        let dev = self.device_dir(bdf)?;
        let ddir = self.root.join("sys/bus/pci/drivers").join(driver);
        rel_symlink(&ddir, &dev.join("driver"))?;
        rel_symlink(&dev, &ddir.join(bdf.to_string()))
    }

    /// Unbinds `bdf` in the tree (removes both links).
    pub fn unlink_driver(&self, bdf: Bdf) -> io::Result<()> {
        let dev = self.device_dir(bdf)?;
        let link = dev.join("driver");
        if let Ok(target) = fs::read_link(&link)
            && let Some(name) = target.file_name()
        {
            // A fixture that never listed it in the group: nothing to remove.
            let _ = fs::remove_file(
                self.root
                    .join("sys/bus/pci/drivers")
                    .join(name)
                    .join(bdf.to_string()),
            );
        }
        match fs::remove_file(&link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The resolved device directory of `bdf`.
    pub fn device_dir(&self, bdf: Bdf) -> io::Result<PathBuf> {
        if let Some(p) = self.paths.get(&bdf) {
            return Ok(p.clone());
        }
        fs::canonicalize(self.root.join("sys/bus/pci/devices").join(bdf.to_string()))
    }
}

/// Creates `link` pointing at `target` with a relative path, so the tree can
/// be moved or mounted elsewhere.
pub fn rel_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let rel = relative_target(target, link)?;
    match fs::remove_file(link) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    symlink(rel, link)
}

/// `target` relative to the directory of `link`.
fn relative_target(target: &Path, link: &Path) -> io::Result<PathBuf> {
    let from = link
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "link has no parent"))?;
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c.as_os_str());
    }
    Ok(rel)
}
