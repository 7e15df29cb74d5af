/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

/** What estimateBackupSpace() estimates from. Every field is optional. Since version 2. */
@VintfStability
parcelable EstimateRequest {
    /**
     * The update's expected write trace (docs/estimate.md, "The trace format"), opened by the
     * caller: the daemon never opens a path a caller names. A regular file, read from offset 0,
     * at most 512 MiB. Null: estimate from history and declared sizes.
     */
    @nullable ParcelFileDescriptor trace;
    /** Sizes in bytes of the files the update will rewrite (each >= 0). */
    long[] declaredBytes;
    /** Mount point of the checkpointed device; empty: /data (or the only device). */
    @utf8InCpp String mountPoint;
}
