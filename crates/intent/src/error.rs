use std::path::PathBuf;

/// Errors of this crate. Only the policy file can fail hard: host
/// configuration never aborts discovery (it becomes warnings or, when
/// unreadable, admin-owned intent).
#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    /// The policy file could not be read.
    #[error("reading policy file {path}: {source}")]
    ReadPolicy {
        /// The policy file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The policy file is not valid TOML for the policy schema.
    #[error("parsing policy file {path}: {message}")]
    ParsePolicy {
        /// The policy file.
        path: PathBuf,
        /// What the TOML parser said (line and column included).
        message: String,
    },
    /// The policy file parsed but holds a value we refuse.
    #[error("validating policy file {path}: {message}")]
    InvalidPolicy {
        /// The policy file.
        path: PathBuf,
        /// Which value and why.
        message: String,
    },
}
