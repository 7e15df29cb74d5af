/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

import android.system.checkpoint.CheckpointState;
import android.system.checkpoint.RestoreOutcome;

/** A snapshot of the checkpoint state, for status displays and update clients. */
@VintfStability
parcelable CheckpointStatus {
    CheckpointState state = CheckpointState.NONE;
    /** Boot attempts made under the current checkpoint. */
    int attemptsUsed;
    /** Boot attempts left before rollback; -1 = unlimited (tied to the slot). */
    int attemptsLeft;
    /** The budget requested by startCheckpoint (retry + 1); -1 = unlimited; 0 = none. */
    int budget;
    /** The slot suffix recorded with the checkpoint (empty without boot control). */
    @utf8InCpp String slotSuffix;
    /** Names of the configured checkpoint backends (empty: checkpoints not supported). */
    @utf8InCpp String[] backends;
    /** The devices (or mount points) under checkpoint. */
    @utf8InCpp String[] devices;
    /** Backup space in use in bytes; -1 = unknown. */
    long backupBytesUsed;
    /** Backup space still free in bytes; -1 = unknown. */
    long backupBytesFree;
    /** The last restore, if any was recorded. */
    @nullable RestoreOutcome lastRestore;
}
