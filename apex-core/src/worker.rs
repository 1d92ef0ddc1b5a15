//! Worker names, and telling whether the process behind a claim is gone:
//! the one generator of the names claims carry ([`name`], which
//! [`RunOptions::default`](crate::dispatch::RunOptions) uses too). It reads
//! the kernel's description of this process (`/proc`), nothing else.
//!
//! A worker is named `apex-HOST-PID-RANDOM~BOOT.PIDNS.START`: the kernel's
//! boot id, the inode of its pid namespace and its start time (clock ticks
//! since boot). Two containers may share a hostname (and a kernel, so a boot
//! id), but never a pid namespace; a pid reused after a crash has another
//! start time. A claim is taken back at once only when its worker is in this
//! process's own pid namespace on this boot and its pid no longer runs the
//! process that claimed; otherwise it waits for the heartbeat to lapse.

use std::path::Path;

/// Where a process runs: boot, pid namespace, start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    boot: String,
    pid_namespace: String,
    start_ticks: String,
}

impl ProcessIdentity {
    /// This process's identity (Linux; `None` elsewhere).
    pub fn of_self() -> Option<Self> {
        Some(Self {
            boot: boot_id()?,
            pid_namespace: pid_namespace("self")?,
            start_ticks: start_ticks("self")?,
        })
    }

    fn render(&self) -> String {
        format!("{}.{}.{}", self.boot, self.pid_namespace, self.start_ticks)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let identity = Self {
            boot: parts.next()?.to_owned(),
            pid_namespace: parts.next()?.to_owned(),
            start_ticks: parts.next()?.to_owned(),
        };
        parts.next().is_none().then_some(identity)
    }
}

/// This machine's name (Linux; `localhost` elsewhere).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id: String = id.trim().chars().filter(char::is_ascii_hexdigit).collect();
    (!id.is_empty()).then_some(id)
}

fn pid_namespace(pid: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    let digits: String = link
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then_some(digits)
}

/// Field 22 of `/proc/PID/stat`, counted after the command name (which
/// may itself hold spaces and parentheses).
fn start_ticks(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19).map(str::to_owned)
}

/// A name unique to this process, telling which process on which machine
/// holds a claim: `apex-HOST-PID-RANDOM~BOOT.PIDNS.START`.
pub fn name() -> String {
    let random = uuid::Uuid::now_v7().simple().to_string();
    let suffix = &random[random.len() - 8..];
    let base = format!("apex-{}-{}-{suffix}", hostname(), std::process::id());
    match ProcessIdentity::of_self() {
        Some(identity) => format!("{base}~{}", identity.render()),
        None => base,
    }
}

/// Whether `worker` is a process of this machine's boot and pid namespace
/// that no longer runs: its claims can be taken back without waiting.
pub fn is_gone_locally(worker: &str, me: Option<&ProcessIdentity>) -> bool {
    let (Some(me), Some((name, identity))) = (me, worker.split_once('~')) else {
        return false;
    };
    let Some(theirs) = ProcessIdentity::parse(identity) else {
        return false;
    };
    if theirs.boot != me.boot || theirs.pid_namespace != me.pid_namespace {
        return false;
    }
    let Some(pid) = name.strip_prefix("apex-").and_then(|rest| {
        let mut parts = rest.rsplitn(3, '-');
        parts.next();
        parts.next()
    }) else {
        return false;
    };
    if pid.is_empty() || !pid.chars().all(|c| c.is_ascii_digit()) {
        return false;
    }
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return true;
    }
    // The pid runs another process now (reused after a crash).
    start_ticks(pid).is_some_and(|now| now != theirs.start_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_tell_namespaces_and_reused_pids_apart() {
        let Some(me) = ProcessIdentity::of_self() else {
            return; // not Linux
        };
        let mine = name();
        assert!(mine.contains('~'), "{mine}");
        assert!(!is_gone_locally(&mine, Some(&me)), "this process runs");
        let dead_pid = format!("apex-host-4194303-abcd~{}.{}.1", me.boot, me.pid_namespace);
        assert!(is_gone_locally(&dead_pid, Some(&me)));
        // Our own pid, but another start time: the pid was reused.
        let reused = format!(
            "apex-host-{}-abcd~{}.{}.1",
            std::process::id(),
            me.boot,
            me.pid_namespace
        );
        assert!(is_gone_locally(&reused, Some(&me)));
        // Another container on the same kernel and hostname: not ours to judge.
        let other_container = format!("apex-host-4194303-abcd~{}.1.1", me.boot);
        assert!(!is_gone_locally(&other_container, Some(&me)));
        // Old-style names carry no identity: wait for the heartbeat.
        assert!(!is_gone_locally("apex-host-4194303-abcd", Some(&me)));
        assert!(!is_gone_locally("apex-host-x-abcd~a.b", Some(&me)));
    }
}
