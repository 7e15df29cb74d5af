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
    /** The slot suffix current when the event happened (empty if unknown). */
    @utf8InCpp String slotSuffix;
    /** Boot attempts left after the event; -1 = unlimited or not applicable. */
    int attemptsLeft;
    /** Backup space the event consumed in bytes; -1 = unknown. */
    long backupBytes;
    /** Free-form detail (abort reason, restore summary, ...). */
    @utf8InCpp String detail;
}
