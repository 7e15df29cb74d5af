//! The virtual device: a Debian kernel under QEMU (TCG) driven by virtme-ng.
