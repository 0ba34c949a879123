"""What a run reports: results.json (rank 0) and the one-line summary it prints."""
import json
import os
import resource
import socket

import numpy as np

from app.horovod import hvd_tensorflow as hvd, tf

_PRINTED = ("world_size", "global_batch_size", "precision", "epochs_completed", "val_accuracy",
            "wall_seconds", "images_per_sec", "images_per_sec_spread",
            "images_per_sec_per_process", "images_per_sec_by_rank", "cpu_ms_per_image")


def throughput_summary(rank_rates, rank_windows, rank_cpu_per_image):
    """Images/s in total and per process, with their spreads, from every process's mean rate
    and its rates over the same windows of steps (aligned: all run the same steps), and the
    CPU milliseconds per image of the whole job: every process's CPU time over those steps,
    summed, per image trained by all (each trained as many)."""
    rank_rates, rank_windows = np.asarray(rank_rates), np.asarray(rank_windows)
    totals = rank_windows.sum(axis=0)
    return {
        "cpu_ms_per_image": 1000 * float(np.mean(rank_cpu_per_image)),
        "images_per_sec": float(rank_rates.sum()),
        "images_per_sec_spread": float(totals.std()) if totals.size else None,
        "images_per_sec_per_process": float(rank_rates.mean()),
        "images_per_sec_per_process_spread": float(rank_windows.std())
        if rank_windows.size else None,
        "images_per_sec_by_rank": [float(rate) for rate in rank_rates],
    }


def gathered(throughput, voxels_per_example=None, optimizer_state_elements=0):
    """What every rank measured, gathered to every rank (collectives: every rank calls
    this): throughput (segmentation's also in voxels/s), peak memory, the elements of the
    optimizer's state it holds (its slots: 1/N of them when sharded), and where each rank
    ran."""
    measured = {**gathered_throughput(throughput), **gathered_peak_memory(),
                "optimizer_state_elements_by_rank": [int(value) for value in hvd.allgather(
                    tf.constant([optimizer_state_elements], tf.int64)).numpy()],
                **gathered_layout()}
    if voxels_per_example and measured["images_per_sec"]:
        measured["voxels_per_sec"] = measured["images_per_sec"] * voxels_per_example
    return measured


def gathered_throughput(throughput):
    """Every rank's measured rates (callbacks.Throughput), gathered and summarized; every
    rank measured the same steps."""
    if throughput.images_per_sec() is None:
        return {"images_per_sec": None}
    gathered_rates = hvd.allgather(tf.constant(
        [[throughput.images_per_sec(), throughput.cpu_seconds_per_image(),
          *throughput.window_rates()]], tf.float64)).numpy()
    return throughput_summary(gathered_rates[:, 0], gathered_rates[:, 2:],
                              gathered_rates[:, 1])


def gathered_peak_memory():
    """Every rank's peak resident memory so far, in MiB (the kernel's high-water mark of the
    process: the runtime's, the model's, its optimizer's and activations')."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peaks = hvd.allgather(tf.constant([peak], tf.float64)).numpy()
    return {"peak_memory_mb_by_rank": [round(float(value), 1) for value in peaks]}


def gathered_layout():
    """Where every rank ran: its host, its rank on the host and among the hosts, and how many
    of each (Horovod's own count)."""
    return {"processes": hvd.allgather_object({
        "rank": hvd.rank(), "host": socket.gethostname(), "local_rank": hvd.local_rank(),
        "local_size": hvd.local_size(), "cross_rank": hvd.cross_rank(),
        "cross_size": hvd.cross_size()})}


def summary(history, initial_epoch, reached, measured, **run):
    """The results of a fit: `run`'s settings, the epochs completed, the last epoch's
    metrics (`history`: Keras'), when the target accuracy was `reached` (epoch, seconds)
    and the `measured` throughput."""
    final = {name: float(values[-1]) for name, values in history.history.items()}
    return {
        **run,
        "epochs_completed": initial_epoch + len(history.epoch),
        "target_reached": dict(zip(("epoch", "wall_seconds"), reached)) if reached else None,
        **{key: final.get(key) for key in ("loss", "accuracy", "val_loss", "val_accuracy")},
        "final_metrics": final,
        **measured,
    }


def write(model_dir, results):
    """MODEL_DIR/results.json, and the main figures as one JSON line on stdout."""
    with open(os.path.join(model_dir, "results.json"), "w") as results_file:
        json.dump(results, results_file, indent=2)
    print(json.dumps({key: results.get(key) for key in _PRINTED}))
