//! `portico replica-shim -- CMD...`: the small supervisor every orchestrated replica
//! runs under, so that a replica never outlives the gateway, even when its command is
//! a wrapper that starts more processes. The gateway starts the shim as the leader of
//! a new process group with a parent-death signal (SIGTERM); the shim starts CMD in that
//! group. When the gateway dies (even by SIGKILL) or asks the replica to stop, the shim
//! forwards SIGTERM to the whole group, waits for CMD up to the grace period, then
//! SIGKILLs the group, itself included.

use std::time::{Duration, Instant};

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Runs the shim; returns the exit code (of CMD when it exits by itself).
pub fn run(cmd: &[String], grace: Duration) -> i32 {
    if cmd.is_empty() {
        eprintln!("replica-shim: no command");
        return 1;
    }
    let watched = sigset(&[libc::SIGTERM, libc::SIGINT, libc::SIGCHLD, libc::SIGHUP]);
    // SAFETY: prctl, getppid and sigprocmask on this process only.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() == 1 {
            return 1; // the gateway is already gone
        }
        libc::sigprocmask(libc::SIG_BLOCK, &watched, std::ptr::null_mut());
    }
    let mut command = std::process::Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // SAFETY: only sigprocmask (async-signal-safe) between fork and exec: the command
    // must not inherit the shim's blocked signals.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            let all = sigset(&[libc::SIGTERM, libc::SIGINT, libc::SIGCHLD, libc::SIGHUP]);
            libc::sigprocmask(libc::SIG_UNBLOCK, &all, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("replica-shim: cannot start {:?}: {e}", cmd[0]);
            return 127;
        }
    };
    let group = -(std::process::id() as i32);
    let mut stopping: Option<Instant> = None;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // CMD is gone: whatever it left in the group goes too.
            let code = status.code().unwrap_or(1);
            // SAFETY: signals our own process group.
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                libc::kill(group, libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_millis(50));
            unsafe {
                libc::kill(group, libc::SIGKILL);
            }
            return code;
        }
        if let Some(t) = stopping {
            if t.elapsed() >= grace {
                // SAFETY: signals our own process group (this process included).
                unsafe {
                    libc::kill(group, libc::SIGKILL);
                }
            }
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: waits for one of the blocked signals, at most 100 ms.
        let sig = unsafe { libc::sigtimedwait(&watched, std::ptr::null_mut(), &timeout) };
        if (sig == libc::SIGTERM || sig == libc::SIGINT || sig == libc::SIGHUP)
            && stopping.is_none()
        {
            stopping = Some(Instant::now());
            // SAFETY: forwards the stop to CMD (and anything it started).
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
                libc::kill(group, libc::SIGTERM);
            }
        }
    }
}
