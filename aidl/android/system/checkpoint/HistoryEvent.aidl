/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

import android.system.checkpoint.HistoryEventKind;

/** One entry of the checkpoint history kept in the state store. */
@VintfStability
parcelable HistoryEvent {
    /** Monotonic id of the entry in the store. */
    long id;
    /** Wall-clock time, milliseconds since the Unix epoch. */
    long timestampMs;
    HistoryEventKind kind = HistoryEventKind.OTHER;
    /** The retry argument of the request; -2 = not recorded with this event. */
    int requestedRetry = -2;
    /** Boot attempts left after the event; -1 = unlimited or not applicable. */
    long attemptsLeft = -1;
    /** The boot slot current at the event; -1 = unknown. */
    int slot = -1;
    /** The device concerned (restores); empty if none. */
    @utf8InCpp String device;
    /** Short machine-readable outcome (e.g. "restored", "rolled-forward"); empty if none. */
    @utf8InCpp String outcome;
    /** Free-form detail (abort reason, error message); empty if none. */
    @utf8InCpp String message;
    /** Backup space the checkpoint had consumed in bytes; -1 = unknown. */
    long backupBytes = -1;

    // Version 2.

    /**
     * On the entry that ended a checkpoint (COMMITTED, ROLLBACK_ACKNOWLEDGED, RESTORED): the
     * estimate made before it started (neededBytes); -1 = none. backupBytes is then what it
     * really consumed (the most seen while it ran).
     */
    long estimatedBytes = -1;
}
