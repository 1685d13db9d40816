//! The spec's seccomp filter, without the C libseccomp (the agent is a static musl binary).
//!
//! libcontainer applies `linux.seccomp` only through libseccomp, so the agent builds it
//! without that feature and does the job itself: the OCI profile is compiled to classic BPF
//! by `seccompiler` (pure Rust, Firecracker's) in the agent when the container is created, and
//! a libcontainer [`Executor`] installs the programs in the container process right before
//! `execve`, after libcontainer has set up everything else.
//!
//! OCI gives each rule its own action; a seccompiler filter has one match action. So one
//! filter is made per distinct non-allow action (its rules → that action, else allow), plus one
//! for the default action (every named rule → allow, else the default). The kernel runs every
//! installed filter and takes the most severe answer, which is exactly the OCI meaning.
//! Syscall names this architecture does not know are skipped, as runc does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, Spec};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};

/// `EPERM`: the errno of `SCMP_ACT_ERRNO` without `errnoRet` (as runc).
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;
/// The guest's architecture.
const ARCH: TargetArch = TargetArch::x86_64;

/// Errors compiling a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The seccomp action is not supported
    #[error("Seccomp action {0:?} is not supported")]
    Action(LinuxSeccompAction),
    /// The seccomp profile does not compile
    #[error("The seccomp profile does not compile: {0}")]
    Compile(String),
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, SeccompError> {
    use LinuxSeccompAction as A;
    Ok(match a {
        A::ScmpActAllow => json!("allow"),
        A::ScmpActKill | A::ScmpActKillThread => json!("kill_thread"),
        A::ScmpActKillProcess => json!("kill_process"),
        A::ScmpActTrap => json!("trap"),
        A::ScmpActLog => json!("log"),
        A::ScmpActErrno => json!({"errno": errno.unwrap_or(DEFAULT_ERRNO)}),
        A::ScmpActTrace => json!({"trace": errno.unwrap_or(0)}),
        A::ScmpActNotify => return Err(SeccompError::Action(a)),
    })
}

fn op(o: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> (Value, u64) {
    use LinuxSeccompOperator as O;
    let name = match o {
        O::ScmpCmpNe => "ne",
        O::ScmpCmpLt => "lt",
        O::ScmpCmpLe => "le",
        O::ScmpCmpEq => "eq",
        O::ScmpCmpGe => "ge",
        O::ScmpCmpGt => "gt",
        // (arg & value) == valueTwo
        O::ScmpCmpMaskedEq => return (json!({"masked_eq": value}), value_two.unwrap_or(0)),
    };
    (json!(name), value)
}

fn known(name: &str) -> bool {
    let probe = json!({"p": {"mismatch_action": "allow", "match_action": "log",
                             "filter": [{"syscall": name}]}});
    seccompiler::compile_from_json(probe.to_string().as_bytes(), ARCH).is_ok()
}

/// Compiles `linux.seccomp` into the BPF programs to install (none for an allow-all profile).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut groups: BTreeMap<String, (Value, BTreeSet<String>)> = BTreeMap::new();
    let mut named = BTreeSet::new();
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        let args: Vec<Value> = rule
            .args()
            .iter()
            .flatten()
            .map(|a| {
                let (op, val) = op(a.op(), a.value(), a.value_two());
                json!({"index": a.index(), "type": "qword", "op": op, "val": val})
            })
            .collect();
        for name in rule.names().iter().filter(|n| known(n)) {
            let r = if args.is_empty() {
                json!({"syscall": name})
            } else {
                json!({"syscall": name, "args": args})
            };
            named.insert(r.to_string());
            if act != json!("allow") {
                groups
                    .entry(act.to_string())
                    .or_insert_with(|| (act.clone(), BTreeSet::new()))
                    .1
                    .insert(r.to_string());
            }
        }
    }
    let rules = |set: &BTreeSet<String>| -> Vec<Value> {
        set.iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect()
    };
    let mut filters = serde_json::Map::new();
    for (i, (act, set)) in groups.values().enumerate() {
        filters.insert(
            format!("rule{i}"),
            json!({"mismatch_action": "allow", "match_action": act, "filter": rules(set)}),
        );
    }
    if default != json!("allow") {
        filters.insert(
            "default".into(),
            json!({"mismatch_action": default, "match_action": "allow", "filter": rules(&named)}),
        );
    }
    if filters.is_empty() {
        return Ok(Vec::new());
    }
    let map = seccompiler::compile_from_json(Value::Object(filters).to_string().as_bytes(), ARCH)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    Ok(map.into_values().collect())
}

/// One BPF program as it travels to the container helper: `(code, jt, jf, k)` per instruction.
pub type WireProgram = Vec<(u16, u8, u8, u32)>;

/// libcontainer's default executor plus the compiled seccomp programs, installed last.
#[derive(Clone, Debug, Default)]
pub struct SeccompExecutor {
    programs: Arc<Vec<BpfProgram>>,
}

impl SeccompExecutor {
    /// An executor that installs `programs` before `execve`.
    pub fn new(programs: Vec<BpfProgram>) -> Self {
        Self {
            programs: Arc::new(programs),
        }
    }

    /// The programs in their wire form (for the container helper).
    pub fn to_wire(&self) -> Vec<WireProgram> {
        self.programs
            .iter()
            .map(|p| p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect())
            .collect()
    }

    /// The executor for programs received in wire form.
    pub fn from_wire(programs: Vec<WireProgram>) -> Self {
        Self::new(
            programs
                .into_iter()
                .map(|p| {
                    p.into_iter()
                        .map(|(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
                        .collect()
                })
                .collect(),
        )
    }

    fn install(&self) -> Result<(), seccompiler::Error> {
        for p in self.programs.iter() {
            match seccompiler::apply_filter(p) {
                Ok(()) => {}
                // Without CAP_SYS_ADMIN a filter needs no_new_privs (seccomp(2)); runc
                // installs such filters before dropping capabilities, we set NNP instead.
                Err(_) => {
                    // SAFETY: prctl with integer arguments only.
                    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                    seccompiler::apply_filter(p)?;
                }
            }
        }
        Ok(())
    }
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.install()
            .map_err(|e| ExecutorError::Other(format!("cannot install the seccomp filter: {e}")))?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(v: Value) -> LinuxSeccomp {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn profiles_compile_with_unknown_names_skipped() {
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
            ]
        }));
        assert_eq!(compile(&p).unwrap().len(), 2);
        let allow_list = profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read", "write", "exit_group", "execve"], "action": "SCMP_ACT_ALLOW"}]
        }));
        assert_eq!(compile(&allow_list).unwrap().len(), 1);
        let allow_all = profile(json!({"defaultAction": "SCMP_ACT_ALLOW"}));
        assert!(compile(&allow_all).unwrap().is_empty());
        let notify = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]
        }));
        assert!(matches!(compile(&notify), Err(SeccompError::Action(_))));
    }

    #[test]
    fn programs_survive_the_wire_form() {
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        }));
        let programs = compile(&p).unwrap();
        let back = SeccompExecutor::from_wire(SeccompExecutor::new(programs.clone()).to_wire());
        assert_eq!(*back.programs, programs);
    }
}
