//! `portico`: the command line entry point. It parses the command and hands over to
//! `cli`; everything else lives in the library modules below.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc: runs the calling thread's due work, such as returning pages freed
    /// more than `purge_delay` ago to the OS.
    fn mi_collect(force: bool);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h): how long freed
/// pages stay committed before they are returned to the OS, in milliseconds.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// The allocator's settings for a gateway: freed pages go back to the OS after 100 ms
/// instead of mimalloc's 1 s, unless `MIMALLOC_PURGE_DELAY` says otherwise. With
/// [`release_freed_memory`] once a second, the transient memory of a burst of new
/// connections is returned soon after they go idle. Measured in bench/RESULTS.md: no
/// CPU change at 5k and 15k requests/s; 0 ms (immediate) cost ~30 % at 15k/s.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: plain C calls on mimalloc's option table with a valid option index.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 100) }
    }
}

/// Lets mimalloc return the calling thread's long-freed pages to the OS. Its purges
/// otherwise run only on later allocator activity, so a worker that went idle (say,
/// holding thousands of idle keep-alive connections) would keep the transient memory
/// of the connections' first requests resident. Called once a second per worker.
pub fn release_freed_memory() {
    // SAFETY: a plain C call; mimalloc is the allocator linked into this binary.
    unsafe { mi_collect(false) }
}

mod accesslog;
mod admin;
mod aggregate;
mod benchcmd;
mod cli;
mod config;
mod demo_backend;
mod gateway;
mod kubernetes;
mod metrics;
mod orchestrator;
mod proxy;
mod registry;
mod reload;
mod router;
mod server;
mod snapshot;
mod tls;
mod upstream;

fn main() {
    tune_allocator();
    std::process::exit(cli::main());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_meant() {
        // mimalloc v3's own default for `purge_delay` is 1000 ms; no other option has it.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads mimalloc's option table.
            assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
            tune_allocator();
            // SAFETY: as above.
            assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 100);
        }
    }
}
