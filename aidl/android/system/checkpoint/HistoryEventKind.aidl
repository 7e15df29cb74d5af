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
    CHECKPOINT_STARTED = 1,
    BOOT_ATTEMPT = 2,
    COMMITTED = 3,
    ABORTED = 4,
    RESTORED = 5,
    ROLLBACK_NEEDED = 6,
    RESET = 7,
}
