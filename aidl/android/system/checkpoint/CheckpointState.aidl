/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

/**
 * Where the checkpoint state machine stands (docs/configuration.md, vold-checkpoint.md section 2).
 */
@VintfStability
@Backing(type="int")
enum CheckpointState {
    /** No checkpoint is requested and this boot does not run under one. */
    NONE = 0,
    /** startCheckpoint() was called: the next boot runs under a checkpoint. */
    PENDING = 1,
    /** This boot runs under a checkpoint that is not committed yet. */
    CHECKPOINTING = 2,
    /** The retry budget is spent (or the slot fell back): needsRollback() is true. */
    ROLLBACK_NEEDED = 3,
}
