/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

import android.system.checkpoint.EstimateBasis;

/**
 * The backup space a checkpoint of the next update will need (docs/estimate.md, "The output").
 * All sizes in bytes. Since version 2.
 */
@VintfStability
parcelable BackupEstimate {
    /** The mount point estimated for. */
    @utf8InCpp String mountPoint;
    /** The backend method used: "bow", "snapshot" or "f2fs". */
    @utf8InCpp String backend;
    EstimateBasis basis = EstimateBasis.DEFAULT;
    /** The prediction before margin and headroom (backups plus log or metadata). */
    long predictedBytes;
    /** What to keep free (and reserve): prediction + margin + headroom. */
    long neededBytes;
    /** Free space now. */
    long freeBytes;
    /** Free space the update's own new data takes besides the backups; -1 = unknown. */
    long newDataBytes = -1;
    /** How much more must be freed: needed + new data - free, at least 0. */
    long shortfallBytes;
    /** Breakdown: saved data (backups, chunks, blocks written). */
    long dataBytes;
    /** Breakdown: dm-bow's log, dm-snapshot's header and exception areas; 0 for f2fs. */
    long overheadBytes;
    /** Breakdown: the safety margin. */
    long marginBytes;
    /** Breakdown: free space that must remain (the health monitor's action threshold). */
    long headroomBytes;
    /** Past checkpoints the estimate used. */
    int historySamples;
}
