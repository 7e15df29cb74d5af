//! The virtual device's kernel without its decompressor: the `vmlinux` inside Debian's
//! `vmlinuz`, booted through its PVH entry.
//!
//! Under TCG the kernel's own decompressor is slow: Debian's 6.1 kernel is xz-compressed, and
//! from QEMU's start to the kernel's first message took 4.1 s of every boot (6.12, zstd:
//! about 1 s more than its PVH boot). QEMU boots an uncompressed ELF `vmlinux` directly
//! when it carries the PVH entry note (`CONFIG_PVH`, set in Debian's amd64 kernels), so
//! `cargo xtask setup` unpacks it once, beside the `vmlinuz`, and `Vm` boots it. The kernel
//! code that runs is the same; only the decompressor and its KASLR step are skipped.
//!
//! The format facts, from the kernel's x86 boot protocol (Documentation/arch/x86/boot.rst):
//! the setup header's `setup_sects` (0x1f1, 0 meaning 4), magic `HdrS` (0x202), protocol
//! version (0x206, payload fields from 2.08), `payload_offset` and `payload_length` (0x248,
//! 0x24c, relative to the protected-mode code at `(setup_sects + 1) * 512`). The kernel's build
//! appends the uncompressed size (32-bit little-endian) after the compressed stream.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How the payload is compressed (the kernel's `CONFIG_KERNEL_*`): Debian's 6.1 kernel uses
/// xz, its 6.12 kernel zstd. Others (gzip, whose stream ends in its own size rather than the
/// build's, lz4, ...) are refused: no kernel here uses them, so nothing would test them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
}

impl Compression {
    fn detect(stream: &[u8]) -> Option<Self> {
        if stream.starts_with(b"\xfd7zXZ\x00") {
            Some(Compression::Xz)
        } else if stream.starts_with(b"\x28\xb5\x2f\xfd") {
            Some(Compression::Zstd)
        } else {
            None
        }
    }

    /// The Debian tool that decompresses it to stdout (packages xz-utils, zstd).
    fn tool(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

/// The compressed kernel inside a `vmlinuz`.
#[derive(Debug, PartialEq, Eq)]
pub struct Payload<'a> {
    pub compression: Compression,
    /// The compressed stream, without the size the build appended.
    pub stream: &'a [u8],
    /// The uncompressed size the build appended.
    pub size: u64,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Finds the compressed kernel in a bzImage.
pub fn payload(bzimage: &[u8]) -> io::Result<Payload<'_>> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err(invalid("not a bzImage (no HdrS setup header at 0x202)".into()));
    }
    let version = u16_at(bzimage, 0x206).unwrap_or(0);
    if version < 0x208 {
        return Err(invalid(format!(
            "boot protocol {version:#x} has no payload fields (2.08 or later needed)"
        )));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let field = |at| u32_at(bzimage, at).and_then(|v| usize::try_from(v).ok());
    let (Some(offset), Some(length)) = (field(0x248), field(0x24c)) else {
        return Err(invalid("setup header cut short".into()));
    };
    let start = (setup_sects + 1) * 512 + offset;
    let Some(raw) = start.checked_add(length).and_then(|end| bzimage.get(start..end)) else {
        return Err(invalid(format!(
            "payload at {start} of {length} bytes lies outside the {}-byte image",
            bzimage.len()
        )));
    };
    let Some(split) = raw.len().checked_sub(4) else {
        return Err(invalid("payload shorter than its size trailer".into()));
    };
    let (stream, trailer) = raw.split_at(split);
    let Some(compression) = Compression::detect(stream) else {
        return Err(invalid(format!(
            "payload compression is neither xz nor zstd (starts {:02x?})",
            &stream[..stream.len().min(6)]
        )));
    };
    let size = u32_at(trailer, 0).map_or(0, u64::from);
    Ok(Payload { compression, stream, size })
}

/// Whether an ELF64 image carries Xen's PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`, 18),
/// which QEMU needs to boot it as a kernel.
pub fn has_pvh_entry(elf: &[u8]) -> bool {
    const PT_NOTE: u32 = 4;
    const PHYS32_ENTRY: u32 = 18;
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(elf, 0x20), u16_at(elf, 0x36), u16_at(elf, 0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else { return false };
    (0..usize::from(phnum)).any(|i| {
        let ph = phoff + i * usize::from(phentsize);
        if u32_at(elf, ph) != Some(PT_NOTE) {
            return false;
        }
        let (Some(off), Some(len)) = (u64_at(elf, ph + 8), u64_at(elf, ph + 32)) else {
            return false;
        };
        let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(len)) else {
            return false;
        };
        let Some(notes) = off.checked_add(len).and_then(|end| elf.get(off..end)) else {
            return false;
        };
        let mut at = 0;
        let align = |n: usize| n.div_ceil(4) * 4;
        while let (Some(namesz), Some(descsz), Some(kind)) =
            (u32_at(notes, at), u32_at(notes, at + 4), u32_at(notes, at + 8))
        {
            let (namesz, descsz) = (namesz as usize, descsz as usize);
            let name = notes.get(at + 12..at + 12 + namesz).unwrap_or_default();
            if name == b"Xen\0" && kind == PHYS32_ENTRY {
                return true;
            }
            at += 12 + align(namesz) + align(descsz);
        }
        false
    })
}

/// Where setup leaves the PVH image of the kernel whose bzImage is `vmlinuz`:
/// `boot/vmlinuz-<release>` → `boot/vmlinux-<release>`.
pub fn pvh_image_path(vmlinuz: &Path) -> PathBuf {
    let name = vmlinuz.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let release = name.strip_prefix("vmlinuz-").unwrap_or(name);
    vmlinuz.with_file_name(format!("vmlinux-{release}"))
}

/// Unpacks the `vmlinux` of the bzImage `vmlinuz` to [`pvh_image_path`]: decompressed with the
/// payload's tool, checked (the size the build recorded, an ELF with the PVH entry), then
/// renamed into place, so that a present file is always whole.
pub fn unpack_pvh_image(vmlinuz: &Path) -> io::Result<PathBuf> {
    let bzimage = fs::read(vmlinuz)?;
    let payload = payload(&bzimage).map_err(|e| invalid(format!("{}: {e}", vmlinuz.display())))?;
    let dest = pvh_image_path(vmlinuz);
    let partial = dest.with_extension("partial");
    let out = fs::File::create(&partial)?;
    let mut child = Command::new(payload.compression.tool())
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .map_err(|e| {
            io::Error::new(e.kind(), format!("starting {}: {e}", payload.compression.tool()))
        })?;
    // Written from a thread: the tool's output goes to the file, so its stdin never blocks on
    // our reading, but a large write must not wait for the child's exit either.
    let mut stdin = child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?;
    let stream = payload.stream;
    let fed =
        std::thread::scope(|s| s.spawn(move || io::Write::write_all(&mut stdin, stream)).join());
    let status = child.wait()?;
    let fed = fed.unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked")));
    if !status.success() || fed.is_err() {
        let _ = fs::remove_file(&partial);
        return Err(io::Error::other(format!(
            "{} -dc of {}'s payload failed ({status}; {fed:?})",
            payload.compression.tool(),
            vmlinuz.display()
        )));
    }
    let elf = fs::read(&partial)?;
    let checked = if elf.len() as u64 != payload.size {
        Err(format!("decompressed to {} bytes, the image records {}", elf.len(), payload.size))
    } else if !has_pvh_entry(&elf) {
        Err("the kernel has no PVH entry note (CONFIG_PVH): QEMU cannot boot it directly".into())
    } else {
        Ok(())
    };
    if let Err(e) = checked {
        let _ = fs::remove_file(&partial);
        return Err(invalid(format!("{}: {e}", vmlinuz.display())));
    }
    fs::rename(&partial, &dest)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len32(b: &[u8]) -> u32 {
        u32::try_from(b.len()).unwrap()
    }

    /// An ELF64 header with one PT_NOTE program header holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(notes);
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&len32(name).to_le_bytes());
        n.extend_from_slice(&len32(desc).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    /// A bzImage around `stream` (compressed bytes) that records `size`.
    fn bzimage(stream: &[u8], size: u32, setup_sects: u8, offset: u32) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { usize::from(setup_sects) };
        let start = (sects + 1) * 512 + offset as usize;
        let mut img = vec![0u8; start];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(len32(stream) + 4).to_le_bytes());
        img.extend_from_slice(stream);
        img.extend_from_slice(&size.to_le_bytes());
        img.extend_from_slice(b"trailing setup data the payload does not cover");
        img
    }

    fn compress(tool: &str, data: &[u8]) -> Vec<u8> {
        let mut child = Command::new(tool)
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        let writer = std::thread::spawn(move || io::Write::write_all(&mut stdin, &data).unwrap());
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success());
        out.stdout
    }

    #[test]
    fn the_pvh_note_is_found_among_other_notes() {
        let pvh = [note(b"GNU\0", 3, &[1; 20]), note(b"Xen\0", 18, &[0; 8])].concat();
        assert!(has_pvh_entry(&elf_with_notes(&pvh)));
        let other = [note(b"Xen\0", 6, b"linux\0"), note(b"GNU\0", 18, &[0; 8])].concat();
        assert!(!has_pvh_entry(&elf_with_notes(&other)));
        assert!(!has_pvh_entry(b"\x7fELF\x01\x01 a 32-bit ELF"));
        // A program header pointing past the end is no note and no panic.
        let mut cut = elf_with_notes(&pvh);
        cut.truncate(130);
        assert!(!has_pvh_entry(&cut));
    }

    #[test]
    fn a_kernel_is_unpacked_from_each_compression_and_checked() {
        let elf = elf_with_notes(&note(b"Xen\0", 18, &[0; 8]));
        let mut kernel = elf.clone();
        kernel.extend((0..100_000u32).map(|i| (i * 7 % 251) as u8));
        let dir = tempfile::tempdir().unwrap();
        for (tool, compression, setup_sects) in
            [("xz", Compression::Xz, 27), ("zstd", Compression::Zstd, 0)]
        {
            let stream = compress(tool, &kernel);
            let img = bzimage(&stream, len32(&kernel), setup_sects, 716);
            let p = payload(&img).unwrap();
            assert_eq!(p.compression, compression);
            assert_eq!(p.stream, &stream[..]);
            assert_eq!(p.size, kernel.len() as u64);

            let vmlinuz = dir.path().join(format!("vmlinuz-6.1.0-{tool}-amd64"));
            fs::write(&vmlinuz, &img).unwrap();
            let dest = unpack_pvh_image(&vmlinuz).unwrap();
            assert_eq!(dest, dir.path().join(format!("vmlinux-6.1.0-{tool}-amd64")));
            assert!(fs::read(&dest).unwrap() == kernel, "{tool}: unpacked bytes differ");
        }
    }

    #[test]
    fn bad_kernels_are_refused_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let unpack = |name: &str, img: &[u8]| {
            let vmlinuz = dir.path().join(name);
            fs::write(&vmlinuz, img).unwrap();
            let err = unpack_pvh_image(&vmlinuz).unwrap_err().to_string();
            assert!(!pvh_image_path(&vmlinuz).exists(), "{name}: a file was left");
            assert!(!pvh_image_path(&vmlinuz).with_extension("partial").exists());
            err
        };
        assert!(unpack("vmlinuz-a", &[0u8; 4096]).contains("not a bzImage"));
        let no_pvh = elf_with_notes(&note(b"Xen\0", 6, b"linux\0"));
        let img = bzimage(&compress("xz", &no_pvh), len32(&no_pvh), 27, 0);
        assert!(unpack("vmlinuz-b", &img).contains("no PVH entry"));
        let pvh = elf_with_notes(&note(b"Xen\0", 18, &[0; 8]));
        let img = bzimage(&compress("xz", &pvh), len32(&pvh) + 1, 27, 0);
        assert!(unpack("vmlinuz-c", &img).contains("records"));
        let img = bzimage(b"not compressed at all", 21, 27, 0);
        assert!(unpack("vmlinuz-d", &img).contains("neither xz nor zstd"));
        let img = bzimage(&compress("gzip", &pvh), len32(&pvh), 27, 0);
        assert!(unpack("vmlinuz-f", &img).contains("neither xz nor zstd"));
        let mut img = bzimage(&compress("xz", &pvh), len32(&pvh), 27, 0);
        img.truncate(3000);
        assert!(unpack("vmlinuz-e", &img).contains("outside"));
    }
}
