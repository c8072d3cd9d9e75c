use std::path::PathBuf;

/// Errors reading the host model. Each names the path that failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The host root is missing or is not a directory.
    #[error("host root {path}: {reason}")]
    BadRoot {
        /// The host root given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A sysfs attribute held something that is not what the kernel writes.
    #[error("{path}: unexpected content {content:?}: {reason}")]
    Parse {
        /// The sysfs attribute file that was read.
        path: PathBuf,
        /// What it held (truncated).
        content: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A string is not a PCI address `DDDD:BB:DD.F`.
    #[error("{0:?} is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:65:00.0)")]
    BadBdf(String),
    /// A string is not a usable driver name.
    #[error("{0:?} is not a valid driver name")]
    BadDriverName(String),
}

impl HostError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HostError::Io {
            path: path.into(),
            source,
        }
    }
}
