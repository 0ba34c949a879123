"""tf.data pipelines for one process of `size`: pure TensorFlow, rank and size are arguments.

Training: shard -> cache -> shuffle (seeded, reshuffled each epoch) -> repeat -> parallel map
-> batch (drop_remainder) -> prefetch. Epoch e is the shard shuffled with a seed made of
(`seed`, e), repeated as needed and cut to exactly steps_per_epoch batches, so every rank runs
the same number of steps whatever the size of its shard, and a run resumed at epoch e reads
what an uninterrupted run would have read, with nothing skipped.

Sharding is by file (with interleave) when there are at least as many files as processes,
otherwise by example. With `deterministic`, every rank shuffles the whole split identically
and takes its own slice of each global batch instead, so a global batch holds the same
examples at any number of processes.
"""
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
_EPOCH_SEED_STRIDE = 1_000_003  # a prime: seeds (seed, epoch) do not collide across seeds


def training_dataset(source, *, rank, size, batch_size, steps_per_epoch, seed, first_epoch=0,
                     shuffle_buffer=10_000, cache="none", deterministic=False, threads=None):
    """Batches of `batch_size` (per process) for rank `rank` of `size`, epoch after epoch
    from `first_epoch` on, each epoch exactly `steps_per_epoch` batches."""
    if deterministic:
        records = _cached(source.all_records(), cache, f"{source.name}-unsharded", rank, size)
        examples_per_epoch = steps_per_epoch * batch_size * size
    else:
        records = _cached(_shard(source, rank, size), cache, source.name, rank, size)
        examples_per_epoch = steps_per_epoch * batch_size
    buffer = min(shuffle_buffer, source.num_examples)

    def epoch(number):
        shuffled = records.shuffle(buffer, seed=seed * _EPOCH_SEED_STRIDE + number,
                                   reshuffle_each_iteration=True)
        epoch_records = shuffled.repeat().take(examples_per_epoch)
        if deterministic:
            slice_of_rank = _global_batch_slice(rank, size, batch_size)
            epoch_records = epoch_records.enumerate().filter(slice_of_rank).map(
                lambda _, record: record)
        return epoch_records

    epochs = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch)
    examples = _decoded(epochs, source, training=True)
    batches = examples.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    return batches.with_options(_options(deterministic, threads))


def evaluation_dataset(source, *, rank, size, batch_size, cache="none", repeat=False,
                       threads=None):
    """Rank `rank`'s disjoint share of the split, in order, in batches of `batch_size` (the
    last one partial), once; or forever with `repeat` (for a fixed number of steps)."""
    records = _cached(_shard(source, rank, size), cache, source.name, rank, size)
    if repeat:
        records = records.repeat()
    examples = _decoded(records, source, training=False)
    batches = examples.batch(batch_size, drop_remainder=repeat).prefetch(AUTOTUNE)
    return batches.with_options(_options(True, threads))


def shard_by_file(source, size):
    """Whether the split is split among processes by file rather than by example."""
    return len(source.files) >= size


def _shard(source, rank, size):
    if not shard_by_file(source, size):
        return source.all_records().shard(size, rank)
    files = tf.data.Dataset.from_tensor_slices(list(source.files)).shard(size, rank)
    files_per_rank = len(source.files) // size
    return files.interleave(source.read_file, cycle_length=min(files_per_rank, 8),
                            num_parallel_calls=AUTOTUNE, deterministic=True)


def _global_batch_slice(rank, size, batch_size):
    """Example i is position i % (size * batch_size) of its global batch; rank r keeps the
    positions [r * batch_size, (r + 1) * batch_size)."""
    global_batch = size * batch_size

    def keep(index, _record):
        return (index % global_batch) // batch_size == rank
    return keep


def _cached(records, cache, name, rank, size):
    """`cache` is none, memory, or a file path prefix; a file cache is one per split and rank."""
    if cache == "none":
        return records
    if cache == "memory":
        return records.cache()
    return records.cache(f"{cache}.{name}.{rank}-of-{size}")


def _decoded(records, source, training):
    """Records decoded in parallel (and augmented for training); undecodable ones dropped
    when the source skips errors."""
    decode = source.decode
    if training and source.augment is not None:
        def decode(*record):
            return source.augment(*source.decode(*record))
    examples = records.map(decode, num_parallel_calls=AUTOTUNE)
    return examples.ignore_errors() if source.skip_errors else examples


def _options(deterministic, threads):
    options = tf.data.Options()
    options.deterministic = deterministic
    if threads:
        options.threading.private_threadpool_size = threads
    return options
