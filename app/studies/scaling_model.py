"""Predicts images/s and scaling efficiency at 1 to 1024 processes, to plan an allocation:
from one process's measured step time and the model's gradient size, for a network.

    python -m app.studies.scaling_model --results=runs/np1/results.json --network=ib200 \\
        --processes_per_node=8 --hierarchical
    python -m app.studies.scaling_model --step_ms=510 --gradient_mb=170 --batch=64 \\
        --network=roce25 --processes_per_node=4
    python -m app.studies.scaling_model --published     # against Horovod's and NVIDIA's
    mpirun -np 2 -H node1,node2 python -m app.studies.scaling_model --measure_network

Weak scaling (the batch per process stays): a step on p processes is the one-process step
(compute) plus the part of Horovod's allreduce that is not hidden behind it:

- the gradients go out in fused buffers of --fusion_mb (HOROVOD_FUSION_THRESHOLD); a ring
  allreduce of B bytes over p processes takes 2 (p-1) latencies and moves 2 (p-1)/p B over
  each process's link; hierarchical (HOROVOD_HIERARCHICAL_ALLREDUCE, or NCCL's own rings
  inside a node): a reduce-scatter and an allgather inside each node over --node_network,
  and a ring over the nodes, whose bandwidth the node's processes share;
- Horovod coordinates once a cycle (--cycle_ms, HOROVOD_CYCLE_TIME): half a cycle waited
  on average, and a negotiation of 2 log2(p) latencies;
- overlap: Horovod sends each buffer while the backward pass (2/3 of the step) goes on, so
  at best only what outlasts the backward pass shows, and never less than the last buffer,
  which waits for the last gradients; at worst nothing overlaps. The table gives both.
- --sharded (--shard_optimizer_state, app.parallel.sharded_optimizer): the gradients are
  reduce-scattered (a ring's first half: (p-1) latencies, (p-1)/p B) while the backward
  pass goes on, and the updated weights allgathered (its second half) after the update,
  which nothing hides; Horovod's reducescatter and allgather are flat rings over all the
  processes (no hierarchical form).
- curvature (--curvature_allreduce_mb, --curvature_broadcast_mb: app.kfac, app.shampoo):
  after the gradients, nothing left to hide it behind: K-FAC allreduces its factors every
  --kfac_factor_steps updates and broadcasts each factor's eigenvectors (the factors' size)
  from the rank that decomposed it every --kfac_inverse_steps; Shampoo broadcasts its roots
  (each block's two sides squared) every --shampoo_root_steps. A broadcast of B bytes,
  pipelined along a ring: (p-1) latencies and B over each link. Each is spread over the
  steps between two of them.

A model, not a measurement: it leaves out stragglers, the network's congestion, the data
pipeline and the allreduce's own compute. BENCHMARKS.md compares it with runs here and with
published figures. Writes scaling_model.md, .csv and .json to --out_dir.
"""
import collections
import json
import math
import os

from app import cli
from app.studies import harness

MB = 2 ** 20
# latency (s) and bandwidth (bytes/s) of one process's link: presets
NETWORKS = {
    # measured here (--measure_network, BENCHMARKS.md): 2 ranks of this machine (shared
    # memory), and of 2 hosts of scripts/simulated_cluster.sh (TCP over a bridge); the
    # latency is that of a whole eager allreduce, Horovod's and TensorFlow's overhead included
    "loopback": (190e-6, 1.07e9),
    "simulated_nodes": (360e-6, 0.43e9),
    "roce25": (10e-6, 2.8e9),   # 25 Gb/s RoCE, as in Horovod's paper
    "ib100": (5e-6, 11e9),      # 100 Gb/s InfiniBand (EDR, HDR100), NCCL's per-hop latency
    "ib200": (5e-6, 22e9),      # 200 Gb/s InfiniBand (HDR)
    "nvlink": (3e-6, 130e9),    # inside a node: NVLink (V100 NVLink 2 ring bandwidth)
    "pcie": (5e-6, 10e9),       # inside a node: PCIe 3 x16
}
# Horovod's paper (Sergeev and Del Balso, 2018, figure 7): 128 servers of 4 Pascal GPUs,
# 25 Gb/s RoCE, batch 64 per GPU. Step times of one P100 from TensorFlow's benchmarks
# (images/s per GPU); gradient sizes: the models' float32 parameters.
PUBLISHED = (
    # model, step ms, gradient MB, batch, efficiency at 512 GPUs
    ("Inception V3", 1000 * 64 / 142, 23.8e6 * 4 / MB, 64, 0.88),
    ("ResNet-101", 1000 * 64 / 125, 44.5e6 * 4 / MB, 64, 0.88),
    ("VGG-16", 1000 * 64 / 150, 138.4e6 * 4 / MB, 64, 0.68),
)
# NVIDIA's DeepLearningExamples, ResNet-50 v1.5 for TensorFlow 1 (Horovod, XLA, 20.06
# container), weak scaling inside one server over NVLink/NVSwitch; float32 gradients of its
# 25.56M parameters.
PUBLISHED_DLE = (
    # server, precision, batch per GPU, images/s on 1 GPU, GPUs, images/s on them
    ("DGX-1 (V100)", "FP32", 128, 412, 8, 3170),
    ("DGX-1 (V100)", "AMP", 256, 1270, 8, 9510),
    ("DGX-2 (V100)", "FP32", 128, 432, 16, 6500),
    ("DGX-2 (V100)", "AMP", 256, 1300, 16, 17250),
    ("DGX A100", "TF32", 256, 909, 8, 7000),
    ("DGX A100", "AMP", 256, 2375, 8, 17400),
)
RESNET50_GRADIENT_MB = 25.56e6 * 4 / MB
BACKWARD_SHARE = 2 / 3  # of a step: the backward pass costs about twice the forward


def ring_allreduce_seconds(size_bytes, processes, latency, bandwidth):
    """A ring allreduce of `size_bytes` over `processes`, each on a link of `latency` s and
    `bandwidth` bytes/s."""
    if processes == 1:
        return 0.0
    return 2 * (processes - 1) * (latency + size_bytes / processes / bandwidth)


def ring_half_seconds(size_bytes, processes, per_node, network, node_network):
    """A flat ring's reduce-scatter (or allgather) of `size_bytes` over `processes`: half a
    ring allreduce, over `node_network` inside one node, else at `network`'s pace."""
    inside = processes <= per_node
    return ring_allreduce_seconds(size_bytes, processes,
                                  *(node_network if inside else network)) / 2


def broadcast_seconds(size_bytes, processes, latency, bandwidth):
    """A broadcast of `size_bytes` to `processes`, pipelined along a ring of links of
    `latency` s and `bandwidth` bytes/s."""
    if processes == 1:
        return 0.0
    return (processes - 1) * latency + size_bytes / bandwidth


# A curvature preconditioner's traffic: `allreduce_bytes` every `allreduce_steps` updates
# and `broadcast_bytes` every `broadcast_steps` (NO_CURVATURE: a first-order optimizer's)
Curvature = collections.namedtuple(
    "Curvature", "allreduce_bytes allreduce_steps broadcast_bytes broadcast_steps")
NO_CURVATURE = Curvature(0, 1, 0, 1)


def curvature_seconds(curvature, processes, per_node, network, node_network, hierarchical):
    """`curvature`'s traffic per step on `processes`, spread over the steps between."""
    inside = processes <= per_node
    allreduce = allreduce_seconds(curvature.allreduce_bytes, processes, per_node, network,
                                  node_network, hierarchical) if curvature.allreduce_bytes else 0
    broadcast = broadcast_seconds(curvature.broadcast_bytes, processes,
                                  *(node_network if inside else network)) \
        if curvature.broadcast_bytes else 0
    return allreduce / curvature.allreduce_steps + broadcast / curvature.broadcast_steps


def allreduce_seconds(size_bytes, processes, per_node, network, node_network, hierarchical):
    """One buffer's allreduce over `processes`, `per_node` to a node, flat over `network` or
    hierarchical (inside the node over `node_network`, across nodes over `network`)."""
    if not hierarchical or per_node == 1 or processes <= per_node:
        inside = processes <= per_node
        return ring_allreduce_seconds(size_bytes, processes,
                                      *(node_network if inside else network))
    nodes = processes // per_node
    return (ring_allreduce_seconds(size_bytes, per_node, *node_network)
            + ring_allreduce_seconds(size_bytes, nodes, *network))


def step_seconds(compute, gradient_bytes, processes, per_node, network, node_network,
                 hierarchical=False, fusion_bytes=64 * MB, cycle=0.001, sharded=False,
                 curvature=NO_CURVATURE):
    """(step without overlap, step with the best overlap) on `processes`, in seconds;
    `sharded`: reduce-scatter during the backward pass, allgather after the update;
    `curvature`: a preconditioner's traffic after the gradients'."""
    if processes == 1:
        return compute, compute
    buffers = max(1, math.ceil(gradient_bytes / fusion_bytes))
    last = gradient_bytes - (buffers - 1) * fusion_bytes
    if sharded:
        def reduction(size):
            return ring_half_seconds(size, processes, per_node, network, node_network)
    else:
        def reduction(size):
            return allreduce_seconds(size, processes, per_node, network, node_network,
                                     hierarchical)
    last_buffer = reduction(last)
    communication = (buffers - 1) * reduction(fusion_bytes) + last_buffer
    coordination = cycle / 2 + 2 * math.log2(processes) * network[0]
    hidden = max(communication - BACKWARD_SHARE * compute, last_buffer)
    # the weights' allgather moves what the reduce-scatter moved, after the update
    allgather = communication if sharded else 0.0
    after = allgather + coordination + curvature_seconds(
        curvature, processes, per_node, network, node_network, hierarchical)
    return compute + communication + after, compute + hidden + after


def predict(compute, gradient_bytes, batch, per_node, network, node_network, hierarchical,
            fusion_bytes, cycle, most=1024, sharded=False, curvature=NO_CURVATURE):
    """Rows for 1, 2, 4, ... `most` processes: images/s and efficiency, no overlap and best."""
    rows = []
    processes = 1
    while processes <= most:
        worst, best = step_seconds(compute, gradient_bytes, processes, per_node, network,
                                   node_network, hierarchical, fusion_bytes, cycle, sharded,
                                   curvature)
        rows.append({"processes": processes, "nodes": math.ceil(processes / per_node),
                     "step_ms_no_overlap": 1000 * worst, "step_ms_overlap": 1000 * best,
                     "images_per_sec_no_overlap": processes * batch / worst,
                     "images_per_sec_overlap": processes * batch / best,
                     "efficiency_no_overlap": compute / worst,
                     "efficiency_overlap": compute / best})
        processes *= 2
    return rows


def first_below(rows, threshold, key):
    """The fewest processes whose `key` efficiency is below `threshold` (None: never)."""
    return next((row["processes"] for row in rows if row[key] < threshold), None)


def measured_run(path):
    """(step seconds, gradient bytes, batch per process) of a run's results.json."""
    with open(path) as results_file:
        results = json.load(results_file)
    if not results.get("images_per_sec_per_process") or not results.get("trainable_parameters"):
        raise ValueError("no images_per_sec_per_process or trainable_parameters (a run of "
                         "app.train with --warmup_steps below its steps is needed)")
    batch = results["batch_size"]
    return batch / results["images_per_sec_per_process"], \
        4 * results["trainable_parameters"], batch


def measure_network(repeats=10):
    """Under mpirun: the latency and bandwidth of one process's link, fitted to the median
    time of Horovod's allreduce of 8 bytes and of 64 MiB on this job's processes; rank 0
    prints them."""
    import statistics
    import time

    from app.horovod import hvd_tensorflow as hvd, tf
    hvd.init()
    seconds = {}
    for size in (8, 64 * MB):
        tensor = tf.ones([size // 4], tf.float32)
        times = []
        for repeat in range(repeats + 1):
            started = time.perf_counter()
            hvd.allreduce(tensor, op=hvd.Sum, name=f"measure-{size}").numpy()
            times.append(time.perf_counter() - started)
        seconds[size] = statistics.median(times[1:])
    processes = hvd.size()
    latency = seconds[8] / (2 * (processes - 1))
    bandwidth = 2 * (processes - 1) / processes * 64 * MB / (seconds[64 * MB] - seconds[8])
    if hvd.rank() == 0:
        print(f"{processes} processes: latency {latency * 1e6:.0f} us, bandwidth "
              f"{bandwidth / 1e9:.2f} GB/s (allreduce of 8 B: {seconds[8] * 1e6:.0f} us, "
              f"of 64 MiB: {seconds[64 * MB] * 1000:.1f} ms)")


def main(argv=None):
    parser = cli.argument_parser("app.studies.scaling_model", __doc__.split("\n\n")[0])
    parser.add_argument("--results", help="a one-process run's results.json (step time, "
                                          "gradient size, batch)")
    parser.add_argument("--step_ms", type=float, help="one process's step (without --results)")
    parser.add_argument("--gradient_mb", type=float, help="gradient MiB allreduced a step")
    parser.add_argument("--batch", type=int, help="batch per process")
    parser.add_argument("--network", default="ib100", choices=NETWORKS,
                        help="between nodes (latency, bandwidth): "
                             + "; ".join(f"{name} {latency * 1e6:g} us {bandwidth / 1e9:g} GB/s"
                                         for name, (latency, bandwidth) in NETWORKS.items()))
    parser.add_argument("--node_network", default="nvlink", choices=NETWORKS,
                        help="between the processes of a node")
    parser.add_argument("--processes_per_node", type=int, default=1)
    parser.add_argument("--hierarchical", action="store_true",
                        help="allreduce inside each node, then across the nodes")
    parser.add_argument("--sharded", action="store_true",
                        help="optimizer state sharded (--shard_optimizer_state): the "
                             "gradients reduce-scattered, the weights allgathered")
    parser.add_argument("--curvature_allreduce_mb", type=float, default=0.0,
                        help="MiB a curvature preconditioner allreduces (K-FAC: its factors)")
    parser.add_argument("--curvature_allreduce_steps", type=int, default=1,
                        help="updates between two (K-FAC: --kfac_factor_steps)")
    parser.add_argument("--curvature_broadcast_mb", type=float, default=0.0,
                        help="MiB a curvature preconditioner broadcasts (K-FAC: its factors' "
                             "eigenvectors, the factors' size; Shampoo: its roots)")
    parser.add_argument("--curvature_broadcast_steps", type=int, default=1,
                        help="updates between two (--kfac_inverse_steps, --shampoo_root_steps)")
    parser.add_argument("--fusion_mb", type=float, default=64.0,
                        help="HOROVOD_FUSION_THRESHOLD in MiB")
    parser.add_argument("--cycle_ms", type=float, default=1.0, help="HOROVOD_CYCLE_TIME")
    parser.add_argument("--max_processes", type=int, default=1024)
    parser.add_argument("--published", action="store_true",
                        help="predict the runs of Horovod's paper and NVIDIA's "
                             "DeepLearningExamples instead, against their figures")
    parser.add_argument("--measure_network", action="store_true",
                        help="under mpirun -np 2 or more: measure the latency and bandwidth "
                             "between its processes (Horovod's allreduce) and print them")
    parser.add_argument("--out_dir", default="runs/scaling_model")
    args = parser.parse_args(argv)
    if args.measure_network:
        return measure_network()
    if args.processes_per_node < 1 or args.max_processes < 1:
        parser.error("--processes_per_node and --max_processes: at least 1")
    if args.sharded and args.hierarchical:
        parser.error("--sharded: Horovod's reducescatter and allgather have no hierarchical "
                     "form; leave out --hierarchical")
    if min(args.curvature_allreduce_steps, args.curvature_broadcast_steps) < 1 or min(
            args.curvature_allreduce_mb, args.curvature_broadcast_mb) < 0:
        parser.error("--curvature_*_steps: at least 1; --curvature_*_mb: not negative")
    curvature = Curvature(args.curvature_allreduce_mb * MB, args.curvature_allreduce_steps,
                          args.curvature_broadcast_mb * MB, args.curvature_broadcast_steps)
    settings = dict(network=NETWORKS[args.network], node_network=NETWORKS[args.node_network],
                    hierarchical=args.hierarchical, fusion_bytes=args.fusion_mb * MB,
                    cycle=args.cycle_ms / 1000)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "scaling_model")
    if args.published:
        return compare_with_published(stem)
    if args.results:
        try:
            compute, gradient_bytes, batch = measured_run(args.results)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--results={args.results}: {error}")
    elif args.step_ms and args.gradient_mb and args.batch:
        compute, gradient_bytes, batch = args.step_ms / 1000, args.gradient_mb * MB, args.batch
    else:
        parser.error("--results, or all of --step_ms, --gradient_mb and --batch")
    if min(compute, gradient_bytes, batch) <= 0:
        parser.error("--step_ms, --gradient_mb and --batch: must be positive")
    rows = predict(compute, gradient_bytes, batch, args.processes_per_node,
                   most=args.max_processes, sharded=args.sharded, curvature=curvature,
                   **settings)
    notes = []
    for threshold in (0.9, 0.8):
        worst = first_below(rows, threshold, "efficiency_no_overlap")
        best = first_below(rows, threshold, "efficiency_overlap")
        notes.append(f"Efficiency below {threshold:.0%}: from {worst or 'beyond'} processes "
                     f"without overlap, from {best or 'beyond'} with it.")
    title = (f"Predicted weak scaling: {compute * 1000:.1f} ms a step, "
             f"{gradient_bytes / MB:.1f} MiB of gradients, batch {batch}, "
             f"{args.processes_per_node} per node, {args.network}"
             f"{' (hierarchical, ' + args.node_network + ' inside)' if args.hierarchical else ''}"
             f"{'; optimizer state sharded' if args.sharded else ''}"
             f"{_curvature_title(curvature) if curvature != NO_CURVATURE else ''}")
    columns = [("processes", lambda row: str(row["processes"])),
               ("nodes", lambda row: str(row["nodes"])),
               ("images/s (no overlap - overlap)",
                lambda row: f"{row['images_per_sec_no_overlap']:,.0f} - "
                            f"{row['images_per_sec_overlap']:,.0f}"),
               ("efficiency", lambda row: f"{row['efficiency_no_overlap']:.0%} - "
                                          f"{row['efficiency_overlap']:.0%}")]
    harness.write_study(stem, rows, columns, title, notes)


def _curvature_title(curvature):
    return (f"; curvature: {curvature.allreduce_bytes / MB:g} MiB allreduced every "
            f"{curvature.allreduce_steps}, {curvature.broadcast_bytes / MB:g} MiB broadcast "
            f"every {curvature.broadcast_steps} steps")


def compare_with_published(stem):
    """Horovod's paper's three models at 512 GPUs (4 a server, 25 Gb/s RoCE, PCIe inside a
    server, flat rings as NCCL 2 ran them), and NVIDIA's ResNet-50 inside one server (NVLink),
    predicted against measured."""
    cases = [(f"Horovod's paper: {model}", "512 P100, 4 a server, 25 Gb/s RoCE", step_ms,
              gradient_mb, 512, 4, NETWORKS["roce25"], NETWORKS["pcie"], published)
             for model, step_ms, gradient_mb, _, published in PUBLISHED]
    cases += [(f"NVIDIA DLE: ResNet-50 v1.5 {precision}", f"{server}, {gpus} GPUs, NVLink",
               1000 * batch / one, RESNET50_GRADIENT_MB, gpus, gpus, NETWORKS["nvlink"],
               NETWORKS["nvlink"], many / (one * gpus))
              for server, precision, batch, one, gpus, many in PUBLISHED_DLE]
    rows = []
    for model, where, step_ms, gradient_mb, gpus, per_node, network, inside, published in cases:
        worst, best = step_seconds(step_ms / 1000, gradient_mb * MB, gpus, per_node, network,
                                   inside)
        rows.append({"model": model, "where": where, "step_ms": step_ms,
                     "gradient_mb": gradient_mb, "gpus": gpus, "published": published,
                     "predicted_no_overlap": step_ms / 1000 / worst,
                     "predicted_overlap": step_ms / 1000 / best})
    columns = [("run", lambda row: row["model"]), ("where", lambda row: row["where"]),
               ("one GPU's step", lambda row: f"{row['step_ms']:.0f} ms"),
               ("gradients", lambda row: f"{row['gradient_mb']:.0f} MiB"),
               ("published", lambda row: f"{row['published']:.0%}"),
               ("predicted (no overlap - overlap)",
                lambda row: f"{row['predicted_no_overlap']:.0%} - "
                            f"{row['predicted_overlap']:.0%}")]
    harness.write_study(stem, rows, columns, "Scaling efficiency: published against the model",
                        ["Inside one NVLink server the model counts only the allreduce, which "
                         "NVLink makes nearly free: it is an upper bound there, and the gap to "
                         "the published figure is what it leaves out (the input pipeline on "
                         "the server's CPUs, stragglers)."])


if __name__ == "__main__":
    main()
