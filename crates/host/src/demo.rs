//! The built-in demo host: an 8-GPU node laid out like a real HGX-class
//! server, with every kind of admin intent the driver must honour.

use std::io;
use std::path::Path;

use crate::Bdf;
use crate::fixture::{FixtureHost, FunctionSpec};

/// What the demo host holds, for printing a guide next to it.
pub const DEMO_DESCRIPTION: &str = "\
demo-node: 8 NVIDIA GPUs behind PCIe switch ports, IOMMU on, vfio-pci a module.
  18:00.0 2a:00.0  H100 SXM5    vfio-pci: vfio-pci.ids=10de:2330 on the cmdline
  3a:00.0          H200         vfio-pci: driverctl (/etc/driverctl.d)
  5d:00.0          H200         vfio-pci: driver_override set by the admin
                   (modprobe.d's ids=10de:2335 is overridden by the cmdline's
                    ids=: kmod applies the command line last)
  9a:00.0          L40S         vfio-pci at start, no record of ours
  ab:00.0          RTX 6000 Ada nvidia, HDA audio ab:00.1 in its IOMMU group
  ba:00.0          A100         nvidia, movable
  db:00.0          L4           nvidia, a ConnectX NIC in its IOMMU group";

const PCI_IDS: &str = "\
# Demo subset of the PCI ID database
10de  NVIDIA Corporation
\t20b2  GA100 [A100 SXM4 80GB]
\t22ba  AD102 High Definition Audio Controller
\t2330  GH100 [H100 SXM5 80GB]
\t2335  GH100 [H200 SXM 141GB]
\t26b1  AD102GL [RTX 6000 Ada Generation]
\t26b9  AD102GL [L40S]
\t27b8  AD104GL [L4]
15b3  Mellanox Technologies
\t101d  MT2892 Family [ConnectX-6 Dx]
144d  Samsung Electronics Co Ltd
\ta80a  NVMe SSD Controller PM9A1/PM9A3/980PRO
8086  Intel Corporation
\t09a2  Ice Lake Memory Map/VT-d
\t0998  Ice Lake IEH
1000  Broadcom / LSI
\tc030  PEX890xx PCIe Gen 5 Switch
";

/// (GPU address, device id, subsystem device, driver, switch port, NUMA node, BARs)
type DemoGpu = (
    &'static str,
    u16,
    u16,
    Option<&'static str>,
    &'static str,
    i32,
    [u64; 3],
);

fn bdf(s: &str) -> io::Result<Bdf> {
    s.parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))
}

/// Builds the demo host under `root` (an empty directory).
#[allow(clippy::too_many_lines)] // a table of the demo node, one statement per fact
pub fn build_demo_host(root: &Path) -> io::Result<FixtureHost> {
    let mut h = FixtureHost::create(root)?;
    h.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz-6.1.0-demo root=UUID=5f0c2e59-9b8e-4d8a-a3f1-0c2b7d3e9a11 ro \
         intel_iommu=on iommu=pt vfio-pci.ids=10de:2330 quiet\n",
    )?;
    h.write("proc/sys/kernel/osrelease", "6.1.0-demo-amd64\n")?;
    h.write(
        "proc/sys/kernel/random/boot_id",
        "9c1e7f52-41b0-4c55-8d8e-2f3a6b7c8d90\n",
    )?;
    // vfio-pci is a module on this kernel: modprobe.d options apply.
    h.write(
        "lib/modules/6.1.0-demo-amd64/modules.builtin",
        "kernel/drivers/pci/pcie/portdrv.ko\nkernel/drivers/iommu/intel/iommu.ko\n",
    )?;
    h.write(
        "lib/modules/6.1.0-demo-amd64/modules.alias",
        "alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia\n\
         alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n",
    )?;
    h.write(
        "etc/modprobe.d/vfio.conf",
        "# Pass the H200s through to VMs (overridden: the kernel command line sets ids= too)\noptions vfio_pci ids=10de:2335\nsoftdep nvidia pre: vfio-pci\n",
    )?;
    h.write("etc/modprobe.d/nouveau.conf", "blacklist nouveau\n")?;
    // What `doctor` reads: the CPU vendor and a VT-d unit whose ECAP has
    // bit 3 (interrupt remapping) set, with unsafe interrupts not allowed.
    h.write(
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n",
    )?;
    h.write("sys/class/iommu/dmar0/intel-iommu/ecap", "f0205ef\n")?;
    h.write(
        "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
        "N\n",
    )?;
    h.write("etc/driverctl.d/pci-0000:3a:00.0", "vfio-pci\n")?;
    h.write("usr/share/misc/pci.ids", PCI_IDS)?;
    for d in [
        "vfio-pci",
        "nvidia",
        "snd_hda_intel",
        "mlx5_core",
        "nvme",
        "pcieport",
    ] {
        h.add_driver(d)?;
    }

    // Platform functions: host bridges and an NVMe drive, each alone in a group.
    let mut group = 0;
    let mut next_group = || {
        group += 1;
        group
    };
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:00.0")?, 0x8086, 0x09a2, 0x088000).group(next_group()),
    )?;
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:01.0")?, 0x8086, 0x0998, 0x088000).group(next_group()),
    )?;
    h.add_function(
        &FunctionSpec::new(bdf("0000:01:00.0")?, 0x144d, 0xa80a, 0x010802)
            .driver("nvme")
            .group(next_group())
            .numa(0)
            .bars(&[16 << 10]),
    )?;

    let h100_bars = [16 << 20, 128u64 << 30, 32 << 20];
    let gpus: [DemoGpu; 8] = [
        (
            "0000:18:00.0",
            0x2330,
            0x16c1,
            Some("vfio-pci"),
            "0000:17:00.0",
            0,
            h100_bars,
        ),
        (
            "0000:2a:00.0",
            0x2330,
            0x16c1,
            Some("vfio-pci"),
            "0000:29:00.0",
            0,
            h100_bars,
        ),
        (
            "0000:3a:00.0",
            0x2335,
            0x18be,
            Some("vfio-pci"),
            "0000:39:00.0",
            0,
            [16 << 20, 256u64 << 30, 32 << 20],
        ),
        (
            "0000:5d:00.0",
            0x2335,
            0x18be,
            Some("vfio-pci"),
            "0000:5c:00.0",
            0,
            [16 << 20, 256u64 << 30, 32 << 20],
        ),
        (
            "0000:9a:00.0",
            0x26b9,
            0x1851,
            Some("vfio-pci"),
            "0000:99:00.0",
            1,
            [16 << 20, 64u64 << 30, 32 << 20],
        ),
        (
            "0000:ab:00.0",
            0x26b1,
            0x16a1,
            Some("nvidia"),
            "0000:aa:00.0",
            1,
            [16 << 20, 64u64 << 30, 32 << 20],
        ),
        (
            "0000:ba:00.0",
            0x20b2,
            0x1463,
            Some("nvidia"),
            "0000:b9:00.0",
            1,
            [16 << 20, 128u64 << 30, 32 << 20],
        ),
        (
            "0000:db:00.0",
            0x27b8,
            0x16ca,
            Some("nvidia"),
            "0000:da:00.0",
            1,
            [16 << 20, 32u64 << 30, 32 << 20],
        ),
    ];
    for (addr, device, subsys, driver, port, numa, bars) in gpus {
        let port = bdf(port)?;
        h.add_function(
            &FunctionSpec::new(port, 0x1000, 0xc030, 0x060400)
                .bridge()
                .driver("pcieport")
                .group(next_group())
                .numa(numa),
        )?;
        let g = next_group();
        let mut spec = FunctionSpec::new(bdf(addr)?, 0x10de, device, 0x030200)
            .subsystem(0x10de, subsys)
            .group(g)
            .numa(numa)
            .under(port)
            .bars(&bars);
        if device == 0x26b1 {
            spec.class = 0x030000;
        }
        if let Some(d) = driver {
            spec = spec.driver(d);
        }
        if addr == "0000:5d:00.0" {
            spec = spec.driver_override("vfio-pci");
        }
        let gpu_bdf = spec.bdf;
        h.add_function(&spec)?;
        if device == 0x26b1 {
            // Workstation GPU: its HDA audio function shares the IOMMU group.
            let audio = Bdf::new(gpu_bdf.domain(), gpu_bdf.bus(), 0, 1)
                .ok_or_else(|| io::Error::other("bad audio address"))?;
            h.add_function(
                &FunctionSpec::new(audio, 0x10de, 0x22ba, 0x040300)
                    .subsystem(0x10de, subsys)
                    .driver("snd_hda_intel")
                    .group(g)
                    .numa(numa)
                    .under(port)
                    .bars(&[16 << 10]),
            )?;
        }
        if device == 0x27b8 {
            // A NIC behind the same switch without ACS: one IOMMU group.
            let nic = Bdf::new(gpu_bdf.domain(), gpu_bdf.bus(), 1, 0)
                .ok_or_else(|| io::Error::other("bad NIC address"))?;
            h.add_function(
                &FunctionSpec::new(nic, 0x15b3, 0x101d, 0x020000)
                    .subsystem(0x15b3, 0x0016)
                    .driver("mlx5_core")
                    .group(g)
                    .numa(numa)
                    .under(port)
                    .bars(&[32 << 20])
                    .sriov(8, 0),
            )?;
        }
    }
    h.write("dev/vfio/vfio", "")?;
    // The simulated kernel creates vfio device cdevs too (an iommufd-capable kernel).
    h.write("dev/iommu", "")?;
    Ok(h)
}

/// What the HGX demo host holds.
pub const HGX_DESCRIPTION: &str = "\
hgx-node: HGX H100 baseboard: 8 H100 SXM5 (10de:2330) on nvidia, 4 NVSwitches
  (10de:22a3, class 0x0680, each alone in its IOMMU group, never handed out),
  NVIDIA Fabric Manager (simulated) in Shared NVSwitch mode. Module ids are not
  PCI order (module -> GPU):
    1 9a:00.0   2 ba:00.0   3 ab:00.0   4 db:00.0
    5 18:00.0   6 3a:00.0   7 2a:00.0   8 5d:00.0
  2-GPU partitions (H100, not adjacent modules): 3={1,3} 4={2,4} 5={5,7} 6={6,8}";

/// The HGX demo host's module map, GPU address → module id (the KubeSwift
/// fixture's non-PCI order: module → PCI index {1:4, 2:6, 3:5, 4:7, 5:0,
/// 6:2, 7:1, 8:3}).
pub const HGX_MODULE_MAP: [(&str, u32); 8] = [
    ("0000:18:00.0", 5),
    ("0000:2a:00.0", 7),
    ("0000:3a:00.0", 6),
    ("0000:5d:00.0", 8),
    ("0000:9a:00.0", 1),
    ("0000:ab:00.0", 3),
    ("0000:ba:00.0", 2),
    ("0000:db:00.0", 4),
];

/// Where the HGX demo host keeps the admin's static module map.
pub const HGX_MODULE_MAP_FILE: &str = "etc/vfio-gpu-dra/module-map.json";

/// Builds the HGX demo host under `root` (an empty directory): 8 × H100 SXM
/// on `nvidia`, 4 NVSwitches, and the static module map at
/// [`HGX_MODULE_MAP_FILE`].
pub fn build_hgx_demo_host(root: &Path) -> io::Result<FixtureHost> {
    let mut h = FixtureHost::create(root)?;
    h.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz-6.1.0-demo root=UUID=5f0c2e59-9b8e-4d8a-a3f1-0c2b7d3e9a11 ro \
         intel_iommu=on iommu=pt quiet\n",
    )?;
    h.write("proc/sys/kernel/osrelease", "6.1.0-demo-amd64\n")?;
    h.write(
        "proc/sys/kernel/random/boot_id",
        "4b1f2a60-7c1d-4e55-9a2e-6d3c8b7a1f20\n",
    )?;
    h.write(
        "lib/modules/6.1.0-demo-amd64/modules.builtin",
        "kernel/drivers/pci/pcie/portdrv.ko\nkernel/drivers/iommu/intel/iommu.ko\n",
    )?;
    h.write(
        "lib/modules/6.1.0-demo-amd64/modules.alias",
        "alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia\n\
         alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n",
    )?;
    h.write(
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n",
    )?;
    h.write("sys/class/iommu/dmar0/intel-iommu/ecap", "f0205ef\n")?;
    h.write(
        "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
        "N\n",
    )?;
    h.write("usr/share/misc/pci.ids", PCI_IDS_HGX)?;
    let map: Vec<String> = HGX_MODULE_MAP
        .iter()
        .map(|(b, m)| format!("  \"{b}\": {m}"))
        .collect();
    h.write(
        HGX_MODULE_MAP_FILE,
        &format!("{{\n{}\n}}\n", map.join(",\n")),
    )?;
    // Fabric Manager's configuration, in Shared NVSwitch mode (`doctor` reads it).
    h.write(
        "usr/share/nvidia/nvswitch/fabricmanager.cfg",
        "# Shared NVSwitch multitenancy\nFABRIC_MODE=1\nFM_CMD_UNIX_SOCKET_PATH=/run/nvidia-fabricmanager/socket\n",
    )?;
    for d in ["vfio-pci", "nvidia", "pcieport"] {
        h.add_driver(d)?;
    }
    let mut group = 0;
    let mut next_group = || {
        group += 1;
        group
    };
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:00.0")?, 0x8086, 0x09a2, 0x088000).group(next_group()),
    )?;
    let bars = [16 << 20, 128u64 << 30, 32 << 20];
    for (i, (addr, _)) in HGX_MODULE_MAP.iter().enumerate() {
        let gpu = bdf(addr)?;
        let port = Bdf::new(gpu.domain(), gpu.bus() - 1, 0, 0)
            .ok_or_else(|| io::Error::other("bad port address"))?;
        let numa = i32::from(i >= 4);
        h.add_function(
            &FunctionSpec::new(port, 0x1000, 0xc030, 0x060400)
                .bridge()
                .driver("pcieport")
                .group(next_group())
                .numa(numa),
        )?;
        h.add_function(
            &FunctionSpec::new(gpu, 0x10de, 0x2330, 0x030200)
                .subsystem(0x10de, 0x16c1)
                .driver("nvidia")
                .group(next_group())
                .numa(numa)
                .under(port)
                .bars(&bars),
        )?;
    }
    // The NVSwitches: NVIDIA class 0x0680, each alone in its IOMMU group, on nvidia.
    for bus in [0x05u8, 0x06, 0x07, 0x08] {
        let sw = Bdf::new(0, bus, 0, 0).ok_or_else(|| io::Error::other("bad switch address"))?;
        h.add_function(
            &FunctionSpec::new(sw, 0x10de, 0x22a3, 0x068000)
                .subsystem(0x10de, 0x1796)
                .driver("nvidia")
                .group(next_group())
                .numa(0)
                .bars(&[32 << 20]),
        )?;
    }
    h.write("dev/vfio/vfio", "")?;
    h.write("dev/iommu", "")?;
    Ok(h)
}

const PCI_IDS_HGX: &str = "\
# Demo subset of the PCI ID database
10de  NVIDIA Corporation
\t22a3  GH100 [H100 NVSwitch]
\t2330  GH100 [H100 SXM5 80GB]
8086  Intel Corporation
\t09a2  Ice Lake Memory Map/VT-d
1000  Broadcom / LSI
\tc030  PEX890xx PCIe Gen 5 Switch
";
