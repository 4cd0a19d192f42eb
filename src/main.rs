//! `portico`: the command line entry point. It parses the command and hands over to
//! `cli`; everything else lives in the library modules below.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    std::process::exit(cli::main());
}
