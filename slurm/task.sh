#!/bin/bash
# One SLURM task of a megatron-hope job (slurm/*.sbatch: `srun ... bash slurm/task.sh COMMAND...`): runs COMMAND
# (torchrun, or the trainer itself) and exits 75 when its ranks stopped cleanly after a stop signal, else with
# COMMAND's status. torchrun reports workers that exit 75 as a failure (exit 1), and srun reports a task it
# terminated (after another task's exit, with --kill-on-bad-exit) by the signal; the trainer says a clean stop
# by writing 75 to the file named by MEGATRON_HOPE_STOP_FILE (launch/stop.py), a path unique to this task.
# USR1 is ignored here (only the trainer acts on it); a TERM (a requeue ending the job, or --kill-on-bad-exit)
# waits for COMMAND, which gets it too.
trap '' USR1
trap : TERM
stop=${TMPDIR:-/tmp}/megatron-hope-stop.$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}.$SLURM_PROCID
rm -f "$stop"
status=0
MEGATRON_HOPE_STOP_FILE=$stop "$@" || status=$?
if [ -s "$stop" ]; then status=75; fi
rm -f "$stop"
exit "$status"
