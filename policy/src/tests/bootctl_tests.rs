//! Boot control: the record format, durability of writes, bootloader behaviour, no-HAL.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::fakes::temp_dir;
use crate::{
    BootControl, BootControlError, BootRecord, ErrorKind, FileBootControl, NoBootControl,
    SlotRecord, MAX_PRIORITY, MAX_TRIES,
};

const GOLDEN_NEW_2: &str = "\
# checkpointd boot control record, format: docs/state-machine.md
version=1
current=0
slot=0 suffix=_a priority=15 tries=0 successful=1
slot=1 suffix=_b priority=0 tries=0 successful=0
";

#[test]
fn new_record_has_the_documented_text() {
    assert_eq!(BootRecord::new(2).unwrap().to_text(), GOLDEN_NEW_2);
    assert!(BootRecord::new(0).is_none());
    assert!(BootRecord::new(27).is_none());
}

#[test]
fn record_text_round_trips() {
    let record = BootRecord {
        current: 1,
        slots: vec![
            SlotRecord { suffix: "_a".into(), priority: 14, tries_left: 0, successful: true },
            SlotRecord { suffix: "_b".into(), priority: 15, tries_left: 6, successful: false },
            SlotRecord { suffix: "_c".into(), priority: 0, tries_left: 7, successful: false },
        ],
    };
    let text = record.to_text();
    assert_eq!(BootRecord::parse(&text, Path::new("x")).unwrap(), record);
    // Comments and blank lines are ignored.
    let spaced = format!("\n# hello\n{text}\n\n");
    assert_eq!(BootRecord::parse(&spaced, Path::new("x")).unwrap(), record);
}

#[test]
fn bad_records_are_refused_with_the_line() {
    let cases: &[(&str, usize)] = &[
        ("", 0),
        ("version=2\ncurrent=0\nslot=0 suffix=_a priority=1 tries=0 successful=1\n", 1),
        ("current=0\n", 1),
        ("version=1\ncurrent=1\nslot=0 suffix=_a priority=1 tries=0 successful=1\n", 0),
        ("version=1\ncurrent=0\nslot=1 suffix=_a priority=1 tries=0 successful=1\n", 3),
        ("version=1\ncurrent=0\nslot=0 suffix=_a priority=16 tries=0 successful=1\n", 3),
        ("version=1\ncurrent=0\nslot=0 suffix=_a priority=1 tries=8 successful=1\n", 3),
        ("version=1\ncurrent=0\nslot=0 suffix=_a priority=1 tries=0 successful=2\n", 3),
        ("version=1\ncurrent=0\nslot=0 suffix=_a priority=1 tries=0\n", 3),
        ("version=1\ncurrent=0\nslot=0 suffix=a/b priority=1 tries=0 successful=1\n", 3),
        ("version=1\ncurrent=0\nslot=0 suffix=_a priority=1 tries=0 successful=1 x=1\n", 3),
        ("version=1 extra\ncurrent=0\n", 1),
        ("version=1\ncurrent=0\ncurrent=0\n", 3),
        ("version=1\ncurrent=x\n", 2),
        ("garbage\n", 1),
    ];
    for (text, line) in cases {
        match BootRecord::parse(text, Path::new("/m/bootctl")) {
            Err(e @ BootControlError::Corrupt { .. }) => {
                let BootControlError::Corrupt { line: got, .. } = &e else { unreachable!() };
                assert_eq!(got, line, "{text:?}: {e}");
                assert_eq!(e.kind(), ErrorKind::Corrupt);
                assert!(e.to_string().contains("/m/bootctl"));
            }
            other => panic!("{text:?} gave {other:?}"),
        }
    }
}

#[test]
fn changes_replace_the_record_atomically_and_leave_no_temp_file() {
    let dir = temp_dir();
    let path = dir.path().join(FileBootControl::DEFAULT_FILE_NAME);
    let bc = FileBootControl::create(&path, 2).unwrap();
    let inode = fs::metadata(&path).unwrap().ino();
    bc.set_active_boot_slot(1).unwrap();
    assert_ne!(fs::metadata(&path).unwrap().ino(), inode, "written by rename, not in place");
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [FileBootControl::DEFAULT_FILE_NAME]);
    // A second instance (another process) sees the change.
    let other = FileBootControl::open(&path).unwrap();
    assert_eq!(other.record().unwrap().slots[1].priority, MAX_PRIORITY);
    assert!(matches!(
        FileBootControl::create(&path, 2),
        Err(BootControlError::AlreadyExists { .. })
    ));
}

#[test]
fn update_engine_story_new_slot_tries_then_falls_back() {
    let dir = temp_dir();
    let bc = FileBootControl::create(&dir.path().join("bootctl"), 2).unwrap();
    assert_eq!(bc.bootloader_select().unwrap(), 0);
    bc.set_active_boot_slot(1).unwrap();
    let r = bc.record().unwrap();
    assert_eq!((r.slots[0].priority, r.slots[1].priority), (MAX_PRIORITY - 1, MAX_PRIORITY));
    assert!(!bc.is_slot_marked_successful(1).unwrap());
    for tries_left in (0..MAX_TRIES).rev() {
        assert_eq!(bc.bootloader_select().unwrap(), 1);
        assert_eq!(bc.record().unwrap().slots[1].tries_left, tries_left);
    }
    // Slot 1 never marked successful: the bootloader falls back to slot 0.
    assert_eq!(bc.bootloader_select().unwrap(), 0);
    assert_eq!(bc.current_slot().unwrap(), 0);
    assert_eq!(bc.slot_suffix(0).unwrap(), "_a");
    assert_eq!(bc.slot_count().unwrap(), 2);
}

#[test]
fn marking_successful_keeps_the_new_slot() {
    let dir = temp_dir();
    let bc = FileBootControl::create(&dir.path().join("bootctl"), 2).unwrap();
    bc.set_active_boot_slot(1).unwrap();
    assert_eq!(bc.bootloader_select().unwrap(), 1);
    bc.mark_boot_successful().unwrap();
    assert!(bc.is_slot_marked_successful(1).unwrap());
    for _ in 0..10 {
        assert_eq!(bc.bootloader_select().unwrap(), 1);
    }
}

#[test]
fn nothing_bootable_is_an_error() {
    let dir = temp_dir();
    let path = dir.path().join("bootctl");
    let bc = FileBootControl::create(&path, 2).unwrap();
    let mut r = bc.record().unwrap();
    r.slots[0].priority = 0;
    fs::write(&path, r.to_text()).unwrap();
    assert!(matches!(bc.bootloader_select(), Err(BootControlError::NoBootableSlot { .. })));
}

#[test]
fn invalid_slots_and_missing_files_are_errors() {
    let dir = temp_dir();
    let bc = FileBootControl::create(&dir.path().join("bootctl"), 2).unwrap();
    for e in [
        bc.slot_suffix(2).unwrap_err(),
        bc.is_slot_marked_successful(5).unwrap_err(),
        bc.set_active_boot_slot(2).unwrap_err(),
    ] {
        assert!(matches!(e, BootControlError::InvalidSlot { count: 2, .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
    let e = FileBootControl::open(&dir.path().join("missing")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let opened = FileBootControl::open_or_create(&dir.path().join("made"), 3).unwrap();
    assert_eq!(opened.slot_count().unwrap(), 3);
}

#[test]
fn no_boot_control_is_absent_everywhere() {
    let bc = NoBootControl;
    assert!(!bc.is_present());
    assert!(matches!(bc.current_slot(), Err(BootControlError::NotPresent)));
    assert!(matches!(bc.slot_count(), Err(BootControlError::NotPresent)));
    assert!(matches!(bc.slot_suffix(0), Err(BootControlError::NotPresent)));
    assert!(matches!(bc.is_slot_marked_successful(0), Err(BootControlError::NotPresent)));
    assert!(matches!(bc.mark_boot_successful(), Err(BootControlError::NotPresent)));
    assert!(matches!(bc.set_active_boot_slot(0), Err(BootControlError::NotPresent)));
    assert_eq!(BootControlError::NotPresent.kind(), ErrorKind::BootControl);
}

mod properties {
    use std::path::Path;

    use proptest::prelude::*;

    use crate::{BootRecord, SlotRecord};

    fn record() -> impl Strategy<Value = BootRecord> {
        prop::collection::vec((0u8..=15, 0u8..=7, any::<bool>()), 1..6).prop_flat_map(|slots| {
            let n = u32::try_from(slots.len()).unwrap();
            (0..n).prop_map(move |current| BootRecord {
                current,
                slots: (b'a'..)
                    .zip(&slots)
                    .map(|(letter, &(priority, tries_left, successful))| SlotRecord {
                        suffix: format!("_{}", char::from(letter)),
                        priority,
                        tries_left,
                        successful,
                    })
                    .collect(),
            })
        })
    }

    proptest! {
        #[test]
        fn valid_records_round_trip(r in record()) {
            prop_assert_eq!(BootRecord::parse(&r.to_text(), Path::new("x")).unwrap(), r);
        }

        /// Outside bytes: any text either is refused or parses to a record that serializes
        /// and parses back to itself (no panics, no lossy acceptance).
        #[test]
        fn arbitrary_text_is_refused_or_canonical(text in "(?s).{0,300}") {
            if let Ok(r) = BootRecord::parse(&text, Path::new("x")) {
                prop_assert_eq!(BootRecord::parse(&r.to_text(), Path::new("x")).unwrap(), r);
            }
        }

        /// Single-byte corruptions of a valid record never panic and never yield a record
        /// that fails to round-trip.
        #[test]
        fn corrupted_records_are_refused_or_canonical(
            r in record(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = r.to_text().into_bytes();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(parsed) = BootRecord::parse(&text, Path::new("x")) {
                prop_assert_eq!(BootRecord::parse(&parsed.to_text(), Path::new("x")).unwrap(), parsed);
            }
        }

        /// The bootloader step only ever boots a bootable slot and never adds tries.
        #[test]
        fn select_for_boot_picks_a_bootable_slot(mut r in record()) {
            let before = r.clone();
            match r.select_for_boot() {
                Some(s) => {
                    let i = usize::try_from(s).unwrap();
                    prop_assert!(before.slots[i].is_bootable());
                    prop_assert!(before.slots.iter().all(|o| !o.is_bootable()
                        || o.priority <= before.slots[i].priority));
                    prop_assert_eq!(r.current, s);
                    let spent = u8::from(!before.slots[i].successful);
                    prop_assert_eq!(r.slots[i].tries_left, before.slots[i].tries_left - spent);
                }
                None => {
                    prop_assert!(before.slots.iter().all(|s| !s.is_bootable()));
                    prop_assert_eq!(r, before);
                }
            }
        }
    }
}
