//! seccomp: once a node is up, every thread of the process may make only the system
//! calls a serving node needs (an allow-list); any other fails with `EPERM`. Threads
//! started later (inference sessions, trainers, tokio's blocking pool) inherit it.
//!
//! What is left out on purpose: starting programs (`execve`, and `clone` without
//! `CLONE_THREAD`, so no new process either: `clone3` answers `ENOSYS`, which makes the C
//! library use `clone`, whose flags the filter can read), tracing or reading other
//! processes (`ptrace`, `process_vm_*`), mounts, namespaces, kernel modules, BPF, keyrings,
//! `io_uring`, `userfaultfd`, and changing users or capabilities. Sockets are TCP/UDP over
//! IPv4 and IPv6 only (no Unix sockets: D-Bus, systemd or a container runtime's socket
//! could start programs for us); outbound HTTP is the guest's `allowed_outbound_hosts`,
//! checked in [`crate::egress`]. Signals go only to this process's own threads.

use std::collections::BTreeMap;

use anyhow::Context as _;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// The system calls a serving node makes (measured with `strace -f -c` over the
/// integration tests, plus their close relatives).
fn allowed() -> Vec<libc::c_long> {
    let mut calls = vec![
        // Memory: wasmtime maps, protects and decommits guest memory and code.
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_process_madvise,
        libc::SYS_mincore,
        libc::SYS_memfd_create,
        libc::SYS_membarrier,
        // Threads, time, signals.
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_set_tid_address,
        libc::SYS_rseq,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getppid,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_setaffinity,
        libc::SYS_sched_getparam,
        libc::SYS_sched_getscheduler,
        libc::SYS_getpriority,
        libc::SYS_setpriority,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_prctl,
        libc::SYS_prlimit64,
        libc::SYS_getrusage,
        libc::SYS_sysinfo,
        libc::SYS_uname,
        libc::SYS_getrandom,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        // Files: the state dir (blobs, versions, checkpoints, caches), models, mounts.
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_close,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_readlinkat,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchown,
        libc::SYS_utimensat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fadvise64,
        libc::SYS_flock,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_eventfd2,
        // Network: the listeners (already bound), outbound HTTP, DNS.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        libc::SYS_accept4,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        // Threads only (see `clone` below); `clone3` is answered by the second filter.
        libc::SYS_clone3,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_arch_prctl,
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_rename,
        libc::SYS_unlink,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_chmod,
        libc::SYS_poll,
        libc::SYS_select,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_create,
        libc::SYS_dup2,
        libc::SYS_pipe,
        libc::SYS_accept,
        libc::SYS_getdents,
        libc::SYS_time,
    ]);
    calls
}

fn arch() -> anyhow::Result<seccompiler::TargetArch> {
    std::env::consts::ARCH.try_into().map_err(|e| {
        anyhow::anyhow!(
            "seccomp is not supported on {}: {e:?}",
            std::env::consts::ARCH
        )
    })
}

/// The allow-list: listed calls pass, `clone` passes for threads only, and everything
/// else fails with `EPERM`.
fn allow_list() -> anyhow::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    let equals = |arg: u8, value: u64| -> anyhow::Result<SeccompRule> {
        Ok(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            value,
        )?])?)
    };
    // Sockets for TCP and UDP only: not Unix sockets (D-Bus, systemd, docker.sock
    // could start programs), netlink, packet, vsock or the kernel's crypto API.
    rules.insert(
        libc::SYS_socket,
        vec![
            equals(0, libc::AF_INET as u64)?,
            equals(0, libc::AF_INET6 as u64)?,
        ],
    );
    // Signals to this process's own threads only.
    rules.insert(
        libc::SYS_tgkill,
        vec![equals(0, u64::from(std::process::id()))?],
    );
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// `clone3` answers `ENOSYS` (its flags are in memory the filter cannot read), so
/// the C library falls back to `clone`.
fn no_clone3() -> anyhow::Result<BpfProgram> {
    let filter = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Installs the filters on every thread of this process (and so on every thread it
/// starts later), then checks that starting a program is refused with `EPERM`.
pub fn lock_down() -> anyhow::Result<()> {
    let allow_list = allow_list().context("building the seccomp filter")?;
    let no_clone3 = no_clone3().context("building the seccomp filter")?;
    // In this order: once the allow-list is in, `seccomp` itself is refused.
    seccompiler::apply_filter_all_threads(&no_clone3).context(
        "installing the seccomp filter (run with --no-seccomp where the kernel has none)",
    )?;
    seccompiler::apply_filter_all_threads(&allow_list).context("installing the seccomp filter")?;
    // Shown without an exception in the filter: a program cannot be started.
    match std::process::Command::new("/bin/true").spawn() {
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => {
            tracing::info!(
                "seccomp on for every thread: {} system calls allowed; starting a program fails with EPERM",
                allowed().len() + 3
            );
            Ok(())
        }
        Err(error) => {
            anyhow::bail!("seccomp check: starting a program failed with {error}, not EPERM")
        }
        Ok(mut child) => {
            let _ = child.kill();
            anyhow::bail!("seccomp check: a program could still be started")
        }
    }
}
