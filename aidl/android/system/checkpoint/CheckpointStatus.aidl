/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

import android.system.checkpoint.CheckpointState;
import android.system.checkpoint.HistoryEvent;

/** A snapshot of the checkpoint state, for status displays and update clients. */
@VintfStability
parcelable CheckpointStatus {
    CheckpointState state = CheckpointState.NONE;
    /** The latched checkpointing flag of this boot (isCheckpointing()). */
    boolean isCheckpointing;
    /** What needsRollback() answers now. */
    boolean needsRollback;
    /** The budget requested by startCheckpoint: retry + 1; -1 = unlimited; 0 = none requested. */
    int budget;
    /** Boot attempts made under the current checkpoint. */
    int attemptsUsed;
    /** Boot attempts left before rollback; -1 = unlimited or no checkpoint. */
    int attemptsLeft = -1;
    /** The suffix of the slot that requested the checkpoint (empty if unknown). */
    @utf8InCpp String slotSuffix;
    /** The suffix of the slot running now (empty without boot control). */
    @utf8InCpp String currentSlotSuffix;
    /** Names of the configured checkpoint backends (empty: checkpoints not supported). */
    @utf8InCpp String[] backends;
    /** The devices (or mount points) under checkpoint. */
    @utf8InCpp String[] devices;
    /** Backup space in use in bytes; -1 = unknown. */
    long backupBytesUsed = -1;
    /** Backup space still free in bytes; -1 = unknown. */
    long backupBytesFree = -1;
    /** The last restore recorded in the history (kind RESTORED), if any. */
    @nullable HistoryEvent lastRestore;
}
