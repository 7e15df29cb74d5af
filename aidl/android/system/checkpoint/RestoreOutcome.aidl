/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

/**
 * The outcome of the last restoreCheckpoint()/restoreCheckpointPart() call recorded in the store.
 */
@VintfStability
parcelable RestoreOutcome {
    /** The raw block device that was restored. */
    @utf8InCpp String device;
    /** Wall-clock time of the restore, milliseconds since the Unix epoch. */
    long timestampMs;
    /** 0 on success, else the ICheckpoint error code the call failed with. */
    int errorCode;
    /** Human-readable summary (what was restored, rolled forward or why it failed). */
    @utf8InCpp String message;
}
