//! process.capabilities applied with the `caps` crate.

use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities};

#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("config.json: process.capabilities: unknown capability {0:?}")]
    Unknown(String),
    #[error("config.json: process.capabilities: effective has {0} which is not in permitted")]
    EffectiveNotPermitted(String),
    #[error("cannot {action} capabilities: {reason}")]
    Apply {
        action: &'static str,
        reason: String,
    },
}

/// The five capability sets, converted before fork so the child only makes syscalls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilityPlan {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
}

fn convert(set: &Option<Capabilities>) -> Result<CapsHashSet, CapabilityError> {
    let mut out = CapsHashSet::new();
    for cap in set.iter().flatten() {
        // oci-spec serialises capabilities as "CAP_SYS_ADMIN", which caps parses.
        let name = serde_json::to_value(cap)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let parsed =
            Capability::from_str(&name).map_err(|_| CapabilityError::Unknown(name.clone()))?;
        out.insert(parsed);
    }
    Ok(out)
}

impl CapabilityPlan {
    /// Missing sets are empty, as the OCI spec says.
    pub fn from_spec(spec: &LinuxCapabilities) -> Result<Self, CapabilityError> {
        let plan = Self {
            bounding: convert(spec.bounding())?,
            effective: convert(spec.effective())?,
            permitted: convert(spec.permitted())?,
            inheritable: convert(spec.inheritable())?,
            ambient: convert(spec.ambient())?,
        };
        if let Some(cap) = plan.effective.difference(&plan.permitted).next() {
            return Err(CapabilityError::EffectiveNotPermitted(cap.to_string()));
        }
        Ok(plan)
    }

    /// Drops the bounding set; needs CAP_SETPCAP, so it runs before the uid change.
    pub fn drop_bounding(&self) -> Result<(), CapabilityError> {
        let current = caps::read(None, CapSet::Bounding).map_err(|e| CapabilityError::Apply {
            action: "read bounding",
            reason: e.to_string(),
        })?;
        for cap in current.difference(&self.bounding) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(|e| CapabilityError::Apply {
                action: "drop bounding",
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Sets inheritable, effective, permitted and ambient (after the uid change).
    pub fn apply_sets(&self) -> Result<(), CapabilityError> {
        let apply = |set, value: &CapsHashSet, action| {
            caps::set(None, set, value).map_err(|e| CapabilityError::Apply {
                action,
                reason: e.to_string(),
            })
        };
        apply(CapSet::Inheritable, &self.inheritable, "set inheritable")?;
        apply(CapSet::Effective, &self.effective, "set effective")?;
        apply(CapSet::Permitted, &self.permitted, "set permitted")?;
        caps::clear(None, CapSet::Ambient).map_err(|e| CapabilityError::Apply {
            action: "clear ambient",
            reason: e.to_string(),
        })?;
        for cap in &self.ambient {
            caps::raise(None, CapSet::Ambient, *cap).map_err(|e| CapabilityError::Apply {
                action: "raise ambient",
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_oci_names() {
        let spec: LinuxCapabilities = serde_json::from_value(serde_json::json!({
            "bounding": ["CAP_SYS_ADMIN", "CAP_KILL"],
            "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL"]
        }))
        .unwrap();
        let plan = CapabilityPlan::from_spec(&spec).unwrap();
        assert!(plan.bounding.contains(&Capability::CAP_SYS_ADMIN));
        assert_eq!(plan.effective.len(), 1);
        assert!(plan.ambient.is_empty());
    }

    #[test]
    fn effective_must_be_permitted() {
        let spec: LinuxCapabilities =
            serde_json::from_value(serde_json::json!({"effective": ["CAP_KILL"], "permitted": []}))
                .unwrap();
        assert!(matches!(
            CapabilityPlan::from_spec(&spec),
            Err(CapabilityError::EffectiveNotPermitted(_))
        ));
    }
}
