/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

/** What a history entry records. */
@VintfStability
@Backing(type="int")
enum HistoryEventKind {
    /** An event kind this version of the interface has no name for. */
    OTHER = 0,
    /** startCheckpoint() recorded a request. */
    CHECKPOINT_STARTED = 1,
    /** markBootAttempt() counted a boot. */
    BOOT_ATTEMPT = 2,
    /** commitChanges() committed the checkpoint. */
    COMMITTED = 3,
    /** commitChanges() failed part-way. */
    COMMIT_FAILED = 4,
    /** abortChanges() gave up on the changes. */
    ABORTED = 5,
    /** A restore of a device ran (see `outcome`). */
    RESTORED = 6,
    /** A boot after rollback acknowledged it and cleared the request. */
    ROLLBACK_ACKNOWLEDGED = 7,
    /** The budget ran out and the previous slot was made active. */
    ROLLBACK_SLOT_SWITCH = 8,
    /** Crash recovery at daemon start repaired a transient state. */
    RECOVERY = 9,
}
