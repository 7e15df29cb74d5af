//! The kernel's reason for a failed request, read back from `/dev/kmsg`.
//!
//! Device-mapper targets explain a refused table line only in the kernel log
//! (`device-mapper: table: 254:0: linear: Device lookup failed (-ENXIO)`); the ioctl returns a
//! bare errno. A [`KmsgCursor`] is taken before a request that may fail; on failure
//! [`KmsgCursor::messages_since`] returns the lines logged since, filtered by a prefix. Reading
//! `/dev/kmsg` needs root (and on Android the `kmsg_device` SELinux permission); when it cannot be
//! opened the hint is simply absent.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind as IoKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

/// A position in the kernel log.
#[derive(Debug)]
pub(crate) struct KmsgCursor {
    file: Option<File>,
}

impl KmsgCursor {
    /// Opens `/dev/kmsg` positioned after the newest record (a failure leaves the cursor empty).
    pub(crate) fn at_end() -> Self {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f))
            .ok();
        Self { file }
    }

    /// Messages logged since the cursor was taken whose text contains `needle`, oldest first,
    /// joined with "; ". `None` when there are none or the log cannot be read.
    pub(crate) fn messages_since(self, needle: &str) -> Option<String> {
        let mut file = self.file?;
        let mut out = Vec::new();
        let mut record = vec![0u8; 8192];
        loop {
            match file.read(&mut record) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(text) = record_text(&record[..n]) {
                        if text.contains(needle) {
                            out.push(text);
                        }
                    }
                }
                // EPIPE: records were overwritten while we read; the next read continues.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == IoKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        if out.is_empty() {
            None
        } else {
            Some(out.join("; "))
        }
    }
}

/// The message part of one `/dev/kmsg` record: `prio,seq,usec,flags[,...];text\n[ KEY=v\n]`.
fn record_text(record: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(record);
    let (_, rest) = s.split_once(';')?;
    let line = rest.lines().next()?;
    Some(line.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_text_strips_the_header_and_dictionary() {
        let rec = b"3,1234,5678,-;device-mapper: table: 254:0: linear: Device lookup failed (-ENXIO)\n SUBSYSTEM=block\n";
        assert_eq!(
            record_text(rec).unwrap(),
            "device-mapper: table: 254:0: linear: Device lookup failed (-ENXIO)"
        );
        assert!(record_text(b"garbage").is_none());
    }
}
