use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::HostError;

/// A PCI function address `DDDD:BB:DD.F`, always stored in canonical
/// lower-case form.
///
/// Parsing is strict (exact digits, hex only, device ≤ 0x1f, function ≤ 7), so a
/// `Bdf` is always safe to use as one path component: untrusted input such as
/// a device name in a claim can never become `..` or contain `/`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    domain: u16,
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// The highest address (ffff:ff:1f.7): a key no GPU has.
    pub const HIGHEST: Bdf = Bdf {
        domain: 0xffff,
        bus: 0xff,
        device: 0x1f,
        function: 7,
    };

    /// Builds an address from its parts; `None` if device > 0x1f or function > 7.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device <= 0x1f && function <= 7).then_some(Bdf {
            domain,
            bus,
            device,
            function,
        })
    }
    /// PCI domain (segment).
    pub fn domain(&self) -> u16 {
        self.domain
    }
    /// Bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }
    /// Device (slot) number.
    pub fn device(&self) -> u8 {
        self.device
    }
    /// Function number.
    pub fn function(&self) -> u8 {
        self.function
    }
    /// True when both addresses are functions of the same slot.
    pub fn same_slot(&self, other: &Bdf) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.device == other.device
    }
    /// A DNS-label-safe form, e.g. `0000-65-00-0`.
    pub fn dashed(&self) -> String {
        format!(
            "{:04x}-{:02x}-{:02x}-{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

fn hex_exact<T: TryFrom<u32>>(s: &str, len: usize) -> Option<T> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(|v| T::try_from(v).ok())
}

impl FromStr for Bdf {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HostError::BadBdf(s.chars().take(64).collect());
        let (domain, rest) = s.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        Bdf::new(
            hex_exact(domain, 4).ok_or_else(bad)?,
            hex_exact(bus, 2).ok_or_else(bad)?,
            hex_exact(device, 2).ok_or_else(bad)?,
            hex_exact(function, 1).ok_or_else(bad)?,
        )
        .ok_or_else(bad)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Bdf {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A kernel driver name as it appears under `/sys/bus/pci/drivers/`
/// (e.g. `vfio-pci`, `nvidia`, `snd_hda_intel`).
///
/// Validated so it is always safe as one path component.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DriverName(String);

impl DriverName {
    /// Validates a driver name: 1–64 characters of `[A-Za-z0-9_.-]`, not `.`
    /// or `..`, not starting with `-` (the name reaches `modprobe`'s argv,
    /// where it would be read as an option).
    pub fn new(name: &str) -> Result<Self, HostError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if ok {
            Ok(DriverName(name.to_string()))
        } else {
            Err(HostError::BadDriverName(name.chars().take(64).collect()))
        }
    }
    /// `vfio-pci`, the generic vfio driver.
    pub fn vfio_pci() -> Self {
        DriverName("vfio-pci".to_string())
    }
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// True for vfio-pci and its variant drivers (`nvgrace_gpu_vfio_pci`, …).
    pub fn is_vfio(&self) -> bool {
        is_vfio_driver(&self.0)
    }
}

/// True for `vfio-pci` and vfio-pci variant drivers, which all carry `vfio` in
/// their name (`nvgrace_gpu_vfio_pci`, `mlx5_vfio_pci`, …).
pub fn is_vfio_driver(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('_', "-");
    n == "vfio-pci" || n.contains("vfio-pci") || n.ends_with("-vfio")
}

impl TryFrom<String> for DriverName {
    type Error = HostError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        DriverName::new(&s)
    }
}

impl From<DriverName> for String {
    fn from(d: DriverName) -> String {
        d.0
    }
}

impl fmt::Display for DriverName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DriverName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_never_look_like_options() {
        for bad in ["-v", "--config=/tmp/x", "-", "-nvidia"] {
            assert!(DriverName::new(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<DriverName>(&format!("{bad:?}")).is_err());
        }
        assert!(DriverName::new("nvgrace_gpu_vfio_pci").is_ok());
        assert!(DriverName::new("nvidia-gpu").is_ok());
    }

    #[test]
    fn parses_and_prints_canonical() {
        let b: Bdf = "0000:65:00.0".parse().unwrap();
        assert_eq!(b.to_string(), "0000:65:00.0");
        assert_eq!(b.dashed(), "0000-65-00-0");
        let b: Bdf = "0001:AB:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0001:ab:1f.7");
    }

    #[test]
    fn rejects_hostile_and_malformed() {
        for s in [
            "",
            "../../x",
            "0000:65:00.0/../..",
            "0000:65:00",
            "000:65:00.0",
            "0000:65:20.0",
            "0000:65:00.8",
            "0000:6g:00.0",
            "0000:65:00.0\n",
            " 0000:65:00.0",
            "+000:65:00.0",
        ] {
            assert!(s.parse::<Bdf>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn driver_names() {
        assert!(DriverName::new("vfio-pci").unwrap().is_vfio());
        assert!(DriverName::new("nvgrace_gpu_vfio_pci").unwrap().is_vfio());
        assert!(!DriverName::new("nvidia").unwrap().is_vfio());
        for bad in ["", ".", "..", "a/b", "x y", "nvidia\n"] {
            assert!(DriverName::new(bad).is_err(), "{bad:?}");
        }
    }
}
