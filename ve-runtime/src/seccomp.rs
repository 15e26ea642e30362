//! linux.seccomp from config.json compiled to BPF with seccompiler.
//!
//! seccompiler builds one filter with a single "match" action, while an OCI
//! profile can give each syscall its own action. We compile one filter per
//! distinct action and install them all: the kernel runs every installed filter
//! and keeps the most severe answer, which is what a profile means as long as
//! one syscall is not listed under two different actions (rejected here).
//! A first filter also refuses x32 syscall numbers, which would otherwise
//! bypass a deny list keyed on the x86_64 numbers.

use std::collections::{BTreeMap, HashMap};

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::syscall_table::syscall_number;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("config.json: linux.seccomp: syscall {0:?} does not exist on this architecture")]
    UnknownSyscall(String),
    #[error("config.json: linux.seccomp: action {0} is not supported (use SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_ACT_KILL*, SCMP_ACT_TRAP, SCMP_ACT_LOG)")]
    UnsupportedAction(String),
    #[error("config.json: linux.seccomp.{0} is not supported")]
    UnsupportedField(&'static str),
    #[error("config.json: linux.seccomp: architecture {0} is not supported, this runtime filters x86_64 only")]
    UnsupportedArch(String),
    #[error("config.json: linux.seccomp: syscall {0:?} is listed with two different actions")]
    ConflictingActions(String),
    #[error("config.json: linux.seccomp: argument rule for {syscall:?} is invalid: {reason}")]
    BadArgument { syscall: String, reason: String },
    #[error("cannot compile the seccomp filter: {0}")]
    Compile(String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// A compiled profile: the BPF programs to install, in order.
#[derive(Debug, Clone, Default)]
pub struct CompiledSeccomp {
    programs: Vec<BpfProgram>,
}

impl CompiledSeccomp {
    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
    }

    /// Installs the filters on the calling thread. Called in the container's
    /// init after fork, so it must not allocate much; the programs are ready.
    pub fn install(&self) -> Result<(), SeccompError> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(e.to_string()))?;
        }
        Ok(())
    }
}

fn convert_action(
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
) -> Result<SeccompAction, SeccompError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno_ret.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        other => return Err(SeccompError::UnsupportedAction(other.to_string())),
    })
}

fn convert_operator(op: LinuxSeccompOperator) -> SeccompCmpOp {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => SeccompCmpOp::Ne,
        LinuxSeccompOperator::ScmpCmpLt => SeccompCmpOp::Lt,
        LinuxSeccompOperator::ScmpCmpLe => SeccompCmpOp::Le,
        LinuxSeccompOperator::ScmpCmpEq => SeccompCmpOp::Eq,
        LinuxSeccompOperator::ScmpCmpGe => SeccompCmpOp::Ge,
        LinuxSeccompOperator::ScmpCmpGt => SeccompCmpOp::Gt,
        LinuxSeccompOperator::ScmpCmpMaskedEq => SeccompCmpOp::MaskedEq(u64::MAX),
    }
}

/// Checks a profile without compiling it (used by config validation).
pub fn validate(profile: &LinuxSeccomp) -> Result<(), SeccompError> {
    compile(profile).map(|_| ())
}

/// Compiles an OCI seccomp profile. Pure: no syscalls are made.
pub fn compile(profile: &LinuxSeccomp) -> Result<CompiledSeccomp, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::UnsupportedField("listenerPath"));
    }
    if profile.listener_metadata().is_some() {
        return Err(SeccompError::UnsupportedField("listenerMetadata"));
    }
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        return Err(SeccompError::UnsupportedField("flags"));
    }
    if let Some(archs) = profile.architectures() {
        for arch in archs {
            // Other architectures' syscalls are killed by the architecture check
            // seccompiler puts at the top of every filter.
            if !matches!(
                arch,
                Arch::ScmpArchX86_64 | Arch::ScmpArchNative | Arch::ScmpArchX86 | Arch::ScmpArchX32
            ) {
                return Err(SeccompError::UnsupportedArch(arch.to_string()));
            }
        }
    }
    if !cfg!(target_arch = "x86_64") {
        return Err(SeccompError::UnsupportedArch(
            std::env::consts::ARCH.to_string(),
        ));
    }
    let default_action = convert_action(profile.default_action(), profile.default_errno_ret())?;

    // Rules grouped by action (SeccompAction is neither Ord nor Hash, hence the
    // Vec). Per syscall, `None` means "unconditional", `Some(rules)` means
    // "when any of these argument rules matches".
    type RuleMap = BTreeMap<i64, Option<Vec<SeccompRule>>>;
    fn add(map: &mut RuleMap, number: i64, rule: Option<SeccompRule>) {
        let slot = map.entry(number).or_insert_with(|| Some(Vec::new()));
        match (slot.as_mut(), rule) {
            (_, None) => *slot = None,
            (Some(rules), Some(rule)) => rules.push(rule),
            (None, Some(_)) => {}
        }
    }
    fn finish(map: RuleMap) -> BTreeMap<i64, Vec<SeccompRule>> {
        map.into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect()
    }

    let mut groups: Vec<(SeccompAction, RuleMap)> = Vec::new();
    let mut action_of_syscall: HashMap<String, String> = HashMap::new();
    for entry in profile.syscalls().iter().flatten() {
        let action = convert_action(entry.action(), entry.errno_ret())?;
        if action == default_action {
            continue;
        }
        for name in entry.names() {
            let number =
                syscall_number(name).ok_or_else(|| SeccompError::UnknownSyscall(name.clone()))?;
            let action_text = format!("{action:?}");
            if let Some(previous) = action_of_syscall.insert(name.clone(), action_text.clone()) {
                if previous != action_text {
                    return Err(SeccompError::ConflictingActions(name.clone()));
                }
            }
            let mut conditions = Vec::new();
            for arg in entry.args().iter().flatten() {
                let bad = |reason: String| SeccompError::BadArgument {
                    syscall: name.clone(),
                    reason,
                };
                let index = u8::try_from(arg.index())
                    .map_err(|_| bad(format!("index {} is out of range", arg.index())))?;
                // OCI masked-eq: value is the mask, valueTwo the expected result.
                let (operator, value) = match arg.op() {
                    LinuxSeccompOperator::ScmpCmpMaskedEq => (
                        SeccompCmpOp::MaskedEq(arg.value()),
                        arg.value_two().unwrap_or(0),
                    ),
                    op => (convert_operator(op), arg.value()),
                };
                let condition =
                    SeccompCondition::new(index, SeccompCmpArgLen::Qword, operator, value)
                        .map_err(|e| bad(e.to_string()))?;
                conditions.push(condition);
            }
            let rule = if conditions.is_empty() {
                None
            } else {
                Some(
                    SeccompRule::new(conditions).map_err(|e| SeccompError::BadArgument {
                        syscall: name.clone(),
                        reason: e.to_string(),
                    })?,
                )
            };
            let group = match groups.iter().position(|(a, _)| *a == action) {
                Some(i) => &mut groups[i].1,
                None => {
                    groups.push((action.clone(), RuleMap::new()));
                    &mut groups.last_mut().expect("just pushed").1
                }
            };
            add(group, number, rule);
        }
    }

    let mut programs = vec![x32_guard()];
    let arch = TargetArch::x86_64;
    let compile_one = |rules, mismatch, matched| -> Result<BpfProgram, SeccompError> {
        let filter = SeccompFilter::new(rules, mismatch, matched, arch)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(e.to_string()))
    };
    if default_action != SeccompAction::Allow {
        // The default action applies to every call no group matches: one filter
        // that lets through exactly what the groups list, for them to judge.
        let mut listed = RuleMap::new();
        for (_, rules) in &groups {
            for (nr, rule_list) in rules {
                match rule_list {
                    None => add(&mut listed, *nr, None),
                    Some(list) => list
                        .iter()
                        .for_each(|r| add(&mut listed, *nr, Some(r.clone()))),
                }
            }
        }
        programs.push(compile_one(
            finish(listed),
            default_action.clone(),
            SeccompAction::Allow,
        )?);
    }
    for (action, rules) in groups {
        if action == SeccompAction::Allow {
            continue; // the default filter above already lets these through
        }
        programs.push(compile_one(finish(rules), SeccompAction::Allow, action)?);
    }
    Ok(CompiledSeccomp { programs })
}

/// A filter that answers ENOSYS to x32 syscall numbers (bit 30 set) and lets
/// everything else through to the following filters.
fn x32_guard() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data.nr is at offset 0
        insn(BPF_LD_W_ABS, 0, 0, 0),
        insn(BPF_JGE_K, 0, 1, 0x4000_0000),
        insn(
            BPF_RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn deny_list_compiles_to_guard_plus_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["bpf","keyctl"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().programs.len(), 2);
    }

    #[test]
    fn allow_list_compiles() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
                {"names":["ptrace"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().programs.len(), 3);
    }

    #[test]
    fn unknown_syscall_is_an_error() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["frobnicate"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert!(matches!(compile(&p), Err(SeccompError::UnknownSyscall(n)) if n == "frobnicate"));
    }

    #[test]
    fn notify_and_listener_are_refused() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        );
        assert!(matches!(
            compile(&p),
            Err(SeccompError::UnsupportedAction(_))
        ));
        let p = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/x"}"#);
        assert!(matches!(
            compile(&p),
            Err(SeccompError::UnsupportedField("listenerPath"))
        ));
    }

    #[test]
    fn conflicting_actions_are_refused() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["bpf"],"action":"SCMP_ACT_ERRNO"},
                {"names":["bpf"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        assert!(matches!(
            compile(&p),
            Err(SeccompError::ConflictingActions(_))
        ));
    }
}
