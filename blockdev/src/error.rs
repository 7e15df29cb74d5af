//! The classification every error of this crate maps to, so callers can branch without
//! matching on each concern's variants.

use nix::errno::Errno;

/// What kind of failure happened, independent of which concern reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The object (device, file, target) does not exist.
    NotFound,
    /// The object is in use (open, mounted, claimed).
    Busy,
    /// The object already exists.
    Exists,
    /// The kernel or filesystem does not support the request.
    Unsupported,
    /// The request was malformed or rejected as invalid.
    Invalid,
    /// Out of space.
    NoSpace,
    /// Not allowed (missing capability or SELinux denial).
    Permission,
    /// Data read from a device or the kernel is not in the expected format.
    Corrupt,
    /// Any other I/O failure.
    Io,
}

impl ErrorKind {
    /// The kind an errno maps to.
    pub fn from_errno(errno: Errno) -> Self {
        match errno {
            Errno::ENOENT | Errno::ENXIO | Errno::ENODEV => Self::NotFound,
            Errno::EBUSY | Errno::ETXTBSY => Self::Busy,
            Errno::EEXIST => Self::Exists,
            Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::ENOSYS => Self::Unsupported,
            Errno::EINVAL | Errno::ERANGE | Errno::E2BIG | Errno::ENAMETOOLONG => Self::Invalid,
            Errno::ENOSPC | Errno::EDQUOT => Self::NoSpace,
            Errno::EPERM | Errno::EACCES | Errno::EROFS => Self::Permission,
            _ => Self::Io,
        }
    }

    /// The kind an `std::io::Error` maps to (by errno when it carries one).
    pub fn from_io(err: &std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(code) => Self::from_errno(Errno::from_raw(code)),
            None => match err.kind() {
                std::io::ErrorKind::NotFound => Self::NotFound,
                std::io::ErrorKind::InvalidInput => Self::Invalid,
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                    Self::Corrupt
                }
                std::io::ErrorKind::PermissionDenied => Self::Permission,
                std::io::ErrorKind::Unsupported => Self::Unsupported,
                _ => Self::Io,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_map_to_kinds() {
        assert_eq!(ErrorKind::from_errno(Errno::ENXIO), ErrorKind::NotFound);
        assert_eq!(ErrorKind::from_errno(Errno::EBUSY), ErrorKind::Busy);
        assert_eq!(ErrorKind::from_errno(Errno::ENOTTY), ErrorKind::Unsupported);
        assert_eq!(ErrorKind::from_errno(Errno::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(ErrorKind::from_errno(Errno::EIO), ErrorKind::Io);
        let e = std::io::Error::from_raw_os_error(libc::EEXIST);
        assert_eq!(ErrorKind::from_io(&e), ErrorKind::Exists);
    }
}
