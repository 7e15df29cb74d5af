/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

import android.system.checkpoint.CheckpointState;

/** Events from checkpointd. All calls are oneway: a slow listener never blocks the daemon. */
@VintfStability
oneway interface ICheckpointListener {
    /** The checkpoint state changed (start, commit, abort, budget spent, reset). */
    void onStateChanged(CheckpointState state);
    /** A restore made progress: `done` of `total` blocks handled. */
    void onRestoreProgress(long done, long total);
    /** Backup space fell below the configured threshold. */
    void onLowSpace(long freeBytes);
}
