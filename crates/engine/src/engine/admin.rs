//! The administrator's release (`vfio-gpu-dra release`): which GPUs it may
//! take back, decided here so every caller (the CLI, a script over the
//! library) gets the same guard.

use super::Engine;
use super::view::Outcome;

use vfio_gpu_host::Bdf;

use crate::error::EngineError;
use crate::ledger::Holder;

/// What an administrator's release does with a GPU a ResourceClaim holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimHeld {
    /// Refuse the whole release: Kubernetes, not the admin, owns the GPU
    /// (its VM may still run).
    Refuse,
    /// Release it anyway (`--force`): the admin takes responsibility for
    /// the VM that may still use it.
    Release,
}

/// Whether an administrator may release `bdf`, held by `holder`, under
/// `claims`. Pure: the ledger's holder in, the decision out.
pub fn admin_may_release(
    bdf: Bdf,
    holder: Option<&Holder>,
    claims: ClaimHeld,
) -> Result<(), EngineError> {
    match (holder, claims) {
        (Some(h @ Holder::Claim { .. }), ClaimHeld::Refuse) => Err(EngineError::HeldByClaim {
            bdf,
            holder: h.clone(),
        }),
        _ => Ok(()),
    }
}

impl Engine {
    /// Releases GPUs for the administrator, whoever holds them, in parallel
    /// (results in input order). Every GPU is checked against
    /// [`admin_may_release`] first: one refused GPU refuses the whole
    /// request before anything on the host changes.
    pub fn release_for_admin(
        &self,
        bdfs: &[Bdf],
        claims: ClaimHeld,
    ) -> Result<Vec<Result<Outcome, EngineError>>, EngineError> {
        let ledger = self.ledger();
        for b in bdfs {
            let holder = ledger.gpus.get(b).and_then(|r| r.holder.as_ref());
            admin_may_release(*b, holder, claims)?;
        }
        let reqs: Vec<(Bdf, Option<Holder>)> = bdfs.iter().map(|b| (*b, None)).collect();
        Ok(self.unconfigure_many(&reqs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Holder {
        Holder::Claim {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "vm".into(),
        }
    }

    /// Every holder × every choice: only a claim under `Refuse` is refused.
    #[test]
    fn only_a_claim_held_gpu_is_refused_and_only_without_force() {
        let bdf: Bdf = "0000:65:00.0".parse().expect("bdf");
        let claim = claim();
        for holder in [None, Some(&Holder::Admin), Some(&claim)] {
            for claims in [ClaimHeld::Refuse, ClaimHeld::Release] {
                let refused = admin_may_release(bdf, holder, claims).is_err();
                let expected =
                    matches!(holder, Some(Holder::Claim { .. })) && claims == ClaimHeld::Refuse;
                assert_eq!(refused, expected, "{holder:?} {claims:?}");
            }
        }
    }

    #[test]
    fn the_refusal_names_the_gpu_the_claim_and_the_way_out() {
        let bdf: Bdf = "0000:65:00.0".parse().expect("bdf");
        let err = admin_may_release(bdf, Some(&claim()), ClaimHeld::Refuse).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "0000:65:00.0 is held by claim ns/vm (u1); release it through Kubernetes, or force the release"
        );
    }
}
