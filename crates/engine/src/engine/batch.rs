//! Several GPUs at once: different IOMMU groups in parallel.

use super::Engine;
use super::view::Outcome;

use vfio_gpu_host::Bdf;

use crate::error::EngineError;
use crate::ledger::Holder;

impl Engine {
    /// Configures several GPUs concurrently (different IOMMU groups in
    /// parallel, one group at a time). Results in input order.
    pub fn configure_many(&self, reqs: &[(Bdf, Holder)]) -> Vec<Result<Outcome, EngineError>> {
        in_parallel(reqs, |(b, _)| *b, |(b, h)| self.configure(*b, h.clone()))
    }

    /// Releases several GPUs concurrently.
    pub fn unconfigure_many(
        &self,
        reqs: &[(Bdf, Option<Holder>)],
    ) -> Vec<Result<Outcome, EngineError>> {
        in_parallel(reqs, |(b, _)| *b, |(b, h)| self.unconfigure(*b, h.as_ref()))
    }

    /// GPUs held by `holder`, from the ledger.
    pub fn held_by(&self, holder: &Holder) -> Vec<Bdf> {
        self.ledger()
            .gpus
            .iter()
            .filter(|(_, r)| r.holder.as_ref() == Some(holder))
            .map(|(b, _)| *b)
            .collect()
    }
}

/// Runs `op` on every item on its own thread; results in input order. A
/// thread that panicked is reported for its GPU instead of taking the batch down.
pub(super) fn in_parallel<T: Sync>(
    items: &[T],
    bdf_of: impl Fn(&T) -> Bdf,
    op: impl Fn(&T) -> Result<Outcome, EngineError> + Sync,
) -> Vec<Result<Outcome, EngineError>> {
    let op = &op;
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|it| s.spawn(move || op(it))).collect();
        handles
            .into_iter()
            .zip(items)
            .map(|(h, it)| {
                h.join()
                    .unwrap_or_else(|_| Err(EngineError::Panicked(bdf_of(it))))
            })
            .collect()
    })
}
