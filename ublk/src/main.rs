//! `bow-ublk`: serves a device through the backup-on-write engine (or a pass-through) as
//! /dev/ublkbN, re-attaches to one after a crash, and talks to a running server.

fn main() -> std::process::ExitCode {
    bow_ublk::server::main()
}
