//! checkpointd: the userdata checkpoint-and-rollback daemon (library half, so tests and the
//! benchmark can use its parts). See docs/configuration.md and docs/integration.md.

pub mod backend;
pub mod boot_hal;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fstab;
pub mod listeners;
pub mod monitor;
pub mod notify;
pub mod plan;
pub mod reboot;
pub mod restore;
pub mod service;
pub mod space;
pub mod transport;
