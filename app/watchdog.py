"""Ends a job whose training has stalled, instead of letting it hold its allocation until
the time limit: a rank stopped (SIGSTOP, a dead node) or stuck in a read that never returns
leaves the others waiting in Horovod's next allreduce for ever.

Horovod's own stall inspector cannot end it: it runs in rank 0's coordinator, which waits in
the negotiation with the stalled rank; it only warns (HOROVOD_STALL_CHECK_TIME_SECONDS) of
ranks that are alive but submit different tensors. So every rank runs a thread of its own
that (1) writes a heartbeat file, MODEL_DIR/heartbeats/rank-N, every few seconds while its
process lives, and (2) when this rank's training has made no progress (no batch ended) for
`timeout` seconds, names the ranks whose heartbeat has gone silent, and ends the process.
The lowest rank that is not silent prints the line; mpirun and horovodrun then end the
ranks that are left (a stopped one included). The heartbeats need MODEL_DIR on a filesystem
every rank sees, as checkpoints on a cluster do; without it the line names no rank.
"""
import os
import sys
import threading
import time

import keras

from app import cli


class StallWatchdog(keras.callbacks.Callback):
    """Watches this rank's training progress from on_train_begin to on_train_end."""

    def __init__(self, timeout, heartbeat_dir, rank, size, fail):
        super().__init__()
        self.timeout, self.rank, self.size, self.fail = timeout, rank, size, fail
        self.heartbeat_dir = heartbeat_dir
        self.interval = min(10.0, timeout / 5)
        self._progress = time.monotonic()
        self._done = threading.Event()
        self._thread = None

    def on_train_begin(self, logs=None):
        os.makedirs(self.heartbeat_dir, exist_ok=True)
        self._progress = time.monotonic()
        self._done.clear()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog",
                                        daemon=True)
        self._thread.start()

    def progressed(self):
        """Marks progress: work of the epoch's end that takes long (the topology task's
        design scores) calls it as it goes."""
        self._progress = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self.progressed()

    on_test_batch_end = on_epoch_end = on_train_batch_end

    def on_train_end(self, logs=None):
        self._done.set()
        self._thread.join()
        try:
            os.remove(self._heartbeat(self.rank))
        except OSError:
            pass

    def _heartbeat(self, rank):
        return os.path.join(self.heartbeat_dir, f"rank-{rank}")

    def _watch(self):
        self._beat()
        while not self._done.wait(self.interval):
            self._beat()
            stalled_for = time.monotonic() - self._progress
            if stalled_for > self.timeout:
                self._end(stalled_for)

    def _beat(self):
        try:
            with open(self._heartbeat(self.rank), "w") as heartbeat:
                heartbeat.write(f"{time.time()}\n")
        except OSError:  # a full or lost filesystem: the progress check still runs
            pass

    def _end(self, stalled_for):
        """One line from the lowest live rank, then this process ends with `fail`'s code."""
        silent = {}
        for rank in range(self.size):
            try:
                age = time.time() - os.path.getmtime(self._heartbeat(rank))
            except OSError:
                continue
            if age > 3 * self.interval:
                silent[rank] = age
        who = (", ".join(f"rank {rank} silent for {age:.0f} s" for rank, age in silent.items())
               or "no rank's process is silent (one waits for a read or a collective that "
                  "never returns)")
        live = [rank for rank in range(self.size) if rank not in silent]
        printer = bool(live) and self.rank == live[0]
        if not printer:  # the printer first: mpirun ends every rank at the first one's exit
            time.sleep(2 * self.interval)
        self.fail(f"--stall_timeout={self.timeout:g}: no training progress for "
                  f"{stalled_for:.0f} s; {who}; the same command resumes from the last "
                  f"checkpoint", print_line=printer)


def exit_process(code):
    """How the watchdog's thread ends the process: os._exit, as the main thread is blocked
    in a TensorFlow op, where sys.exit from this thread would never be seen."""
    def end(message, print_line):
        if print_line:
            print(cli.error_line(message), file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(code)
    return end
