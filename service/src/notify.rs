//! The signals the daemon gives its init system.
//!
//! * systemd: `sd_notify` readiness (`READY=1` once the service is registered, which is what
//!   `Type=notify` waits for), a `STATUS=` line when a checkpoint is committed, and
//!   `STOPPING=1`. The protocol is one datagram of `KEY=VALUE` lines to the Unix socket named
//!   by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace); written here
//!   rather than pulled in as a crate because it is those few lines. Without `$NOTIFY_SOCKET`
//!   (not started by systemd) nothing is sent.
//! * Android: the system property [`COMMITTED_PROPERTY`] = `1` when a checkpoint is committed,
//!   as vold sets `vold.checkpoint_committed`, so init.rc can trigger on it.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The property set to `1` when this boot's checkpoint is committed (Android; vold's
/// counterpart is `vold.checkpoint_committed`). Not set on a boot that commits nothing.
pub const COMMITTED_PROPERTY: &str = "checkpointd.checkpoint_committed";

/// Sends `state` (newline-separated `KEY=VALUE` lines) to systemd's notify socket, if this
/// process has one. Returns whether it was sent.
pub fn sd_notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => sd_notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notify socket `socket` (`/path` or `@abstract-name`).
pub fn sd_notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let address = match bytes.split_first() {
        Some((b'@', name)) => abstract_address(name)?,
        Some((b'/', _)) => SocketAddr::from_pathname(socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={socket:?} is neither a path nor @name"),
            ))
        }
    };
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(state.as_bytes(), &address)?;
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short notify datagram"));
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

/// Logs a failure to notify: systemd then times the unit out, which says more than we can.
pub fn sd_notify_logged(state: &str) {
    if let Err(e) = sd_notify(state) {
        log::warn!("sd_notify({:?}): {e}", state.lines().next().unwrap_or_default());
    }
}

/// Announces a committed checkpoint: the Android property, or systemd's status line.
pub fn checkpoint_committed() {
    #[cfg(target_os = "android")]
    if let Err(e) = rsproperties::set(COMMITTED_PROPERTY, "1") {
        log::error!("cannot set {COMMITTED_PROPERTY}=1: {e}");
    }
    sd_notify_logged("STATUS=checkpoint committed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_one_datagram_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind");
        sd_notify_to(path.as_os_str(), "READY=1\nSTATUS=serving").expect("sent");
        assert_eq!(receive(&socket), "READY=1\nSTATUS=serving");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("checkpointd-notify-test-{}", std::process::id());
        let address = abstract_address(name.as_bytes()).expect("address");
        let socket = UnixDatagram::bind_addr(&address).expect("bind abstract");
        sd_notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("sent");
        assert_eq!(receive(&socket), "STOPPING=1");
    }

    #[test]
    fn refuses_a_relative_socket_name_and_reports_a_missing_socket() {
        let err = sd_notify_to(OsStr::new("relative"), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("none");
        assert!(sd_notify_to(missing.as_os_str(), "READY=1").is_err());
    }
}
