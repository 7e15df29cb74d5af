/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

import android.system.checkpoint.BackupEstimate;
import android.system.checkpoint.CheckpointStatus;
import android.system.checkpoint.EstimateRequest;
import android.system.checkpoint.HistoryEvent;
import android.system.checkpoint.ICheckpointListener;
import android.system.checkpoint.ReservationInfo;

/**
 * Userdata checkpoint and rollback for A/B updates.
 *
 * The methods up to resetCheckpoint() have the names, arguments and observable semantics of the
 * checkpoint methods of Android's vold (android.os.IVold). Instance: "default", i.e. the service
 * name "android.system.checkpoint.ICheckpoint/default".
 *
 * Errors: a failed call carries a ServiceSpecificException whose code is one of the errno-style
 * constants below (the values vold uses), or a binder EX_SECURITY (caller not allowed to change
 * state) or EX_ILLEGAL_ARGUMENT (malformed restore path, as vold).
 */
@VintfStability
interface ICheckpoint {
    /** Operation not permitted (e.g. the boot control refused to mark the slot). */
    const int EPERM = 1;
    /** No such file or directory. */
    const int ENOENT = 2;
    /** I/O error from the state store, a device or the boot control. */
    const int EIO = 5;
    /** Try again: restoreCheckpointPart stopped at its limit. */
    const int EAGAIN = 11;
    /** Device or resource busy. */
    const int EBUSY = 16;
    /** Invalid argument or invalid state (e.g. retry < -1, corrupt on-disk data). */
    const int EINVAL = 22;
    /** No space left for the backup. */
    const int ENOSPC = 28;
    /** The state store speaks a newer schema than this daemon (downgrade). */
    const int EPROTO = 71;
    /** Checkpoints are not supported by the configured backends. */
    const int ENOTSUP = 95;
    /** The state store or the boot-control record is corrupt. */
    const int EUCLEAN = 117;

    /**
     * Requests a checkpoint for the next boot with a budget of retry + 1 boot attempts;
     * retry == -1 means unlimited attempts while the current slot stays active.
     * Errors: ENOTSUP without checkpoint support; EINVAL if retry < -1.
     */
    void startCheckpoint(int retry);
    /** Whether this boot runs under a checkpoint; latched at the first call of the boot. */
    boolean needsCheckpoint();
    /** Whether the retry budget is spent and the data must be rolled back. */
    boolean needsRollback();
    /** The latched checkpointing flag, without evaluating anything. */
    boolean isCheckpointing();
    /** Marks the slot successful, commits the backends, then clears the checkpoint. */
    void commitChanges();
    /**
     * Gives up on this boot's changes: without retry the budget is spent; then reboots with
     * `reason`. Does nothing if this boot is not checkpointing. `reason` is at most 4096 bytes
     * (EX_ILLEGAL_ARGUMENT otherwise; docs/limits.md).
     */
    void abortChanges(@utf8InCpp String reason, boolean retry);
    /** Arms the backends for this boot (vold: trim, then dm-bow state 1). */
    void prepareCheckpoint();
    /**
     * Restores an uncommitted block checkpoint on the raw device `device`: at most 4095 bytes
     * (PATH_MAX with its NUL; EX_ILLEGAL_ARGUMENT otherwise, as for a malformed path).
     */
    void restoreCheckpoint(@utf8InCpp String device);
    /** As restoreCheckpoint, but stops after `count` sectors with EAGAIN (0 = no limit). */
    void restoreCheckpointPart(@utf8InCpp String device, int count);
    /** Counts one boot attempt against the budget. */
    void markBootAttempt();
    boolean supportsCheckpoint();
    boolean supportsBlockCheckpoint();
    boolean supportsFileCheckpoint();
    /** Forgets the latched needsCheckpoint() answer so the next call evaluates again. */
    void resetCheckpoint();

    /** The current state, budget, devices and backup space. */
    CheckpointStatus getStatus();
    /** Registers a listener for state changes, restore progress and low space. */
    void registerListener(ICheckpointListener listener);
    /**
     * The newest `limit` history entries, newest first (limit <= 0: all), as many of them as
     * fit in a 256 KiB reply (docs/limits.md).
     */
    HistoryEvent[] getHistory(int limit);

    // Version 2 (a service answers getInterfaceVersion() >= 2). A version-1 service answers
    // these with UNKNOWN_TRANSACTION.

    /**
     * Estimates the backup space the next checkpoint will need (docs/estimate.md). A query:
     * nothing changes, except that the answer is kept to be compared with what the next
     * checkpoint really consumes. Errors: EINVAL (a trace that does not parse or was captured on
     * a device of another size, a negative or absurd declared size, an unknown mount point,
     * a trace that is not a regular file or is larger than 512 MiB); ENOTSUP (no checkpoint
     * backend); EIO (the free space cannot be read).
     */
    BackupEstimate estimateBackupSpace(in EstimateRequest request);
    /**
     * Reserves `bytes` on /data (the device of estimateBackupSpace's default) with a
     * preallocated file, kept free until the checkpoint starts and handed over to the backend
     * then. Errors: EINVAL (bytes <= 0 or more than the device holds), ENOSPC (more than the
     * free space), EBUSY (a reservation is already held: release it first), ENOTSUP.
     * Nothing is reserved when it fails.
     */
    ReservationInfo reserveSpace(long bytes);
    /** Gives the reservation back (nothing to do if none is held). */
    void releaseReservation();
}
