//! The process's file descriptor limit.

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limit() -> Option<(u64, u64)> {
    let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    Some((l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX)))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the usual soft limit
/// of 1024 would make `--max-conns` unreachable (accept fails with EMFILE,
/// and upstream queries find no socket).
pub fn raise_nofile() {
    let Some((soft, hard)) = nofile_limit() else {
        return;
    };
    if soft >= hard {
        return;
    }
    // An unlimited hard limit is still bounded by the kernel's nr_open.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    let new = rustix::process::Rlimit {
        current: Some(target),
        maximum: Some(hard),
    };
    match rustix::process::setrlimit(rustix::process::Resource::Nofile, new) {
        Ok(()) => tracing::info!(from = soft, to = target, "raised the open file limit"),
        Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open file limit"),
    }
}
