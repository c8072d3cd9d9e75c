use std::collections::HashMap;
use std::path::PathBuf;

use crate::{HostError, HostRoot};

/// The host's PCI ID database (`pci.ids`), for product names.
#[derive(Clone, Debug)]
pub struct PciIdsDb {
    text: String,
    /// Where it was read from.
    pub path: PathBuf,
}

impl PciIdsDb {
    /// Loads `usr/share/misc/pci.ids` or `usr/share/hwdata/pci.ids` from the
    /// host root; `Ok(None)` when neither exists.
    pub fn load(root: &HostRoot) -> Result<Option<Self>, HostError> {
        for rel in ["usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids"] {
            let path = root.rel(rel);
            // pci.ids is about 1.3 MB; cap it far above any real one.
            match root.read_bytes_limited(&path, 32 << 20) {
                // pci.ids is UTF-8 in practice; a stray byte must not hide every name.
                Ok(Some(bytes)) => {
                    return Ok(Some(PciIdsDb {
                        text: String::from_utf8_lossy(&bytes).into_owned(),
                        path,
                    }));
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Builds a database from text (tests, demo).
    pub fn from_text(text: impl Into<String>) -> Self {
        PciIdsDb {
            text: text.into(),
            path: PathBuf::new(),
        }
    }

    /// Looks up names for several `(vendor, device)` pairs in one pass.
    pub fn names(
        &self,
        wanted: impl IntoIterator<Item = (u16, u16)>,
    ) -> HashMap<(u16, u16), String> {
        let wanted: Vec<(u16, u16)> = wanted.into_iter().collect();
        let mut out = HashMap::new();
        let mut vendor: Option<u16> = None;
        for line in self.text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            // Device classes follow the vendors and reuse the indentation scheme.
            if line.starts_with("C ") {
                break;
            }
            if let Some(rest) = line.strip_prefix('\t') {
                if rest.starts_with('\t') {
                    continue;
                }
                let Some(v) = vendor else { continue };
                if let Some((id, name)) = split_id(rest)
                    && wanted.contains(&(v, id))
                {
                    out.insert((v, id), name.to_string());
                }
            } else {
                vendor = split_id(line)
                    .map(|(id, _)| id)
                    .filter(|id| wanted.iter().any(|(v, _)| v == id));
            }
        }
        out
    }
}

fn split_id(line: &str) -> Option<(u16, &str)> {
    let (id, name) = line.split_once(' ')?;
    if id.len() != 4 {
        return None;
    }
    Some((u16::from_str_radix(id, 16).ok()?, name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_device_names() {
        let db = PciIdsDb::from_text(
            "# comment\n10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n\t\t10de 16c1  H100 SXM5 80GB\n\t2335  GH100 [H200 SXM 141GB]\n8086  Intel\n\t2330  Not NVIDIA\nC 03  Display controller\n\t00  VGA compatible controller\n",
        );
        let n = db.names([(0x10de, 0x2330), (0x10de, 0x2335), (0x10de, 0x9999)]);
        assert_eq!(n[&(0x10de, 0x2330)], "GH100 [H100 SXM5 80GB]");
        assert_eq!(n[&(0x10de, 0x2335)], "GH100 [H200 SXM 141GB]");
        assert!(!n.contains_key(&(0x10de, 0x9999)));
        assert_eq!(
            db.names([(0x8086, 0x2330)])[&(0x8086, 0x2330)],
            "Not NVIDIA"
        );
    }
}
