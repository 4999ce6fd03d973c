//! Process hardening both binaries apply first thing in `main`, before any secret is read:
//! no core dump can hold key material (`RLIMIT_CORE` = 0, soft and hard) and the process is
//! not dumpable (`PR_SET_DUMPABLE` 0: no core dump whatever the limit or `core_pattern`, and no
//! `ptrace` attach or `/proc/<pid>/mem` read by other processes of the same user).

/// Applies the hardening above.
///
/// # Errors
/// When the kernel refuses either setting; the caller decides whether to go on.
pub fn deny_core_dumps() -> std::io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn no_core_and_not_dumpable() {
        deny_core_dumps().unwrap();
        let core = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
