/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

import android.system.checkpoint.BackendInUse;
import android.system.checkpoint.CheckpointState;
import android.system.checkpoint.HistoryEvent;
import android.system.checkpoint.ReservationInfo;

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

    // Version 2. A version-1 reader skips these (a stable parcelable carries its size).

    /** The backend checkpointing each device, and why it was chosen. */
    BackendInUse[] backendsInUse = {};
    /** The space reserved for the next checkpoint, if any. */
    @nullable ReservationInfo reservation;
    /** neededBytes of the last estimateBackupSpace() answer; -1 = none. */
    long lastEstimateNeededBytes = -1;
    /** predictedBytes of that answer; -1 = none. */
    long lastEstimatePredictedBytes = -1;
    /** When it was made, milliseconds since the Unix epoch; -1 = none. */
    long lastEstimateTimestampMs = -1;
    /** neededBytes of the estimate made before the current checkpoint started; -1 = none. */
    long checkpointEstimatedBytes = -1;
    /** The most backup space the current checkpoint has used so far; -1 = unknown. */
    long backupBytesHighWater = -1;
    /** Backup space the last finished (committed or rolled-back) checkpoint consumed; -1 = none. */
    long lastActualBytes = -1;
    /** The estimate made before that checkpoint (neededBytes); -1 = none. */
    long lastEstimatedBytes = -1;
}
