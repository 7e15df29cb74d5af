/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

/** What a backup-space estimate rests on (docs/estimate.md, "The method"). Since version 2. */
@VintfStability
@Backing(type="int")
enum EstimateBasis {
    /** A write trace replayed through the backend's method. */
    TRACE = 0,
    /** A percentile of this device's past checkpoints. */
    HISTORY = 1,
    /** The update's declared sizes. */
    DECLARED = 2,
    /** The larger of history and declared sizes. */
    HISTORY_AND_DECLARED = 3,
    /** Neither: a default share of the space in use. */
    DEFAULT = 4,
}
