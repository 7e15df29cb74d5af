//! The server's control channel: one line in, one line out, on the abstract unix socket
//! `bow-ublk-<dev id>` (abstract, so that it needs no file system path and works across the
//! server's private mount namespace).

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};

/// A request to the running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Engine: TRIM → CHECKPOINT (the caller ran FITRIM first).
    Checkpoint,
    /// Engine: CHECKPOINT → COMMITTED.
    Commit,
    /// State and space (held writes are given to the engine first).
    Status,
    /// The writes held now (completed, not yet the engine's), without giving them to it.
    Pending,
    /// Stop serving and delete the device (the file system on it must be unmounted).
    Stop,
    /// The checkpoint's write trace so far, in the estimator's format: the reply line
    /// `ok trace <bytes>` is followed by exactly that many bytes ([`fetch_trace`]).
    Trace,
}

impl Command {
    /// Every command.
    pub const ALL: [Command; 6] = [
        Command::Checkpoint,
        Command::Commit,
        Command::Status,
        Command::Pending,
        Command::Stop,
        Command::Trace,
    ];

    /// The word on the wire.
    pub fn word(self) -> &'static str {
        match self {
            Command::Checkpoint => "checkpoint",
            Command::Commit => "commit",
            Command::Status => "status",
            Command::Pending => "pending",
            Command::Stop => "stop",
            Command::Trace => "trace",
        }
    }

    /// Parses one line (surrounding white space ignored).
    pub fn parse(line: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.word() == line.trim())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// The abstract socket name of device `dev_id`'s server.
pub fn socket_name(dev_id: u32) -> String {
    format!("bow-ublk-{dev_id}")
}

/// What went wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no bow-ublk server answers for device {dev_id}: {source}")]
    Connect { dev_id: u32, source: std::io::Error },
    #[error("talking to the bow-ublk server of device {dev_id}: {source}")]
    Io { dev_id: u32, source: std::io::Error },
    #[error("the bow-ublk server of device {dev_id} refused `{command}`: {message}")]
    Refused { dev_id: u32, command: Command, message: String },
}

/// Sends `command` to device `dev_id`'s server; returns its `ok` line's text.
pub fn send(dev_id: u32, command: Command) -> Result<String, ControlError> {
    let mut reader = connect_and_send(dev_id, command)?;
    read_reply(dev_id, command, &mut reader)
}

/// The largest trace a client accepts: the format's record limit (2^24) at its widest record.
pub const TRACE_LIMIT_BYTES: u64 = 512 << 20;

/// Fetches the checkpoint's write trace from device `dev_id`'s server: the bytes of a
/// `checkpoint_estimate::Trace` (docs/estimate.md, "The trace format"). The caller parses
/// them; here only the framing is checked.
pub fn fetch_trace(dev_id: u32) -> Result<Vec<u8>, ControlError> {
    let command = Command::Trace;
    let mut reader = connect_and_send(dev_id, command)?;
    let text = read_reply(dev_id, command, &mut reader)?;
    let refused = |message: String| ControlError::Refused { dev_id, command, message };
    let len = text
        .strip_prefix("trace ")
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| refused(format!("unexpected reply {text:?}")))?;
    let len = usize::try_from(len)
        .ok()
        .filter(|_| len <= TRACE_LIMIT_BYTES)
        .ok_or_else(|| refused(format!("a trace of {len} bytes (at most {TRACE_LIMIT_BYTES})")))?;
    let mut bytes = vec![0; len];
    reader.read_exact(&mut bytes).map_err(|source| ControlError::Io { dev_id, source })?;
    Ok(bytes)
}

fn connect_and_send(
    dev_id: u32,
    command: Command,
) -> Result<BufReader<std::os::unix::net::UnixStream>, ControlError> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};
    let addr = SocketAddr::from_abstract_name(socket_name(dev_id))
        .map_err(|source| ControlError::Connect { dev_id, source })?;
    let mut stream = UnixStream::connect_addr(&addr)
        .map_err(|source| ControlError::Connect { dev_id, source })?;
    writeln!(stream, "{command}").map_err(|source| ControlError::Io { dev_id, source })?;
    Ok(BufReader::new(stream))
}

fn read_reply(
    dev_id: u32,
    command: Command,
    reader: &mut impl BufRead,
) -> Result<String, ControlError> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|source| ControlError::Io { dev_id, source })?;
    parse_reply(&line).map_err(|message| ControlError::Refused { dev_id, command, message })
}

/// `ok <text>` → `Ok(text)`, `error <text>` (or anything else) → `Err(text)`.
pub fn parse_reply(line: &str) -> Result<String, String> {
    let line = line.trim_end();
    match line.split_once(' ').unwrap_or((line, "")) {
        ("ok", rest) => Ok(rest.to_owned()),
        ("error", rest) => Err(rest.to_owned()),
        _ if line.is_empty() => Err("the server closed the connection without a reply".into()),
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_unknown_words_are_refused() {
        for c in Command::ALL {
            assert_eq!(Command::parse(&format!("{c}\n")), Some(c));
        }
        assert_eq!(Command::parse("rollback"), None);
        assert_eq!(Command::parse(""), None);
    }

    #[test]
    fn replies_say_ok_or_why_not() {
        assert_eq!(parse_reply("ok state=1 free=4096\n"), Ok("state=1 free=4096".into()));
        assert_eq!(parse_reply("ok\n"), Ok(String::new()));
        assert_eq!(parse_reply("error not an engine\n"), Err("not an engine".into()));
        assert!(parse_reply("").unwrap_err().contains("without a reply"));
        assert!(parse_reply("hello").unwrap_err().contains("unexpected"));
    }
}
