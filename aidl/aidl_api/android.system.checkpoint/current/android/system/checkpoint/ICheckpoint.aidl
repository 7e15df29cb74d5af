///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
import android.system.checkpoint.BackupEstimate;
import android.system.checkpoint.CheckpointStatus;
import android.system.checkpoint.EstimateRequest;
import android.system.checkpoint.HistoryEvent;
import android.system.checkpoint.ICheckpointListener;
import android.system.checkpoint.ReservationInfo;
@VintfStability
interface ICheckpoint {
    const int EPERM = 1;
    const int ENOENT = 2;
    const int EIO = 5;
    const int EAGAIN = 11;
    const int EBUSY = 16;
    const int EINVAL = 22;
    const int ENOSPC = 28;
    const int EPROTO = 71;
    const int ENOTSUP = 95;
    const int EUCLEAN = 117;
    void startCheckpoint(int retry);
    boolean needsCheckpoint();
    boolean needsRollback();
    boolean isCheckpointing();
    void commitChanges();
    void abortChanges(@utf8InCpp String reason, boolean retry);
    void prepareCheckpoint();
    void restoreCheckpoint(@utf8InCpp String device);
    void restoreCheckpointPart(@utf8InCpp String device, int count);
    void markBootAttempt();
    boolean supportsCheckpoint();
    boolean supportsBlockCheckpoint();
    boolean supportsFileCheckpoint();
    void resetCheckpoint();
    CheckpointStatus getStatus();
    void registerListener(ICheckpointListener listener);
    HistoryEvent[] getHistory(int limit);
    BackupEstimate estimateBackupSpace(in EstimateRequest request);
    ReservationInfo reserveSpace(long bytes);
    void releaseReservation();
}
