"""tf.data pipelines for one process of `size`: pure TensorFlow, rank and size are arguments.

Training: shard -> cache -> shuffle (seeded, reshuffled each epoch) -> repeat -> parallel map
-> batch (drop_remainder) -> prefetch. Epoch e is the shard shuffled with a seed made of
(`seed`, rank, e), repeated as needed and cut to exactly steps_per_epoch batches, so every
rank runs the same number of steps whatever the size of its shard, and a run resumed at epoch
e (or at step s of it, skipping the batches before) reads what an uninterrupted run would
have read.

Sharding is by file (with interleave) when there are at least as many files as processes,
otherwise by example. Files are dealt out anew every epoch: the file list is permuted by
(`seed`, e) alike on every rank, then each rank takes its share, so that an epoch's records
are not the same files' in the same order every time (with a cache, the first epoch's shard
is kept). With `deterministic`, every rank reads the whole split (its files permuted by
epoch the same way), shuffles it identically and takes its own slice of each global batch
instead, so a global batch holds the same examples at any number of processes.

A source's `prepare` (making a generated volume from its index, say) runs before the cache,
the rest of its decoding after it: `--cache` then keeps what `prepare` made.

A spatially parallel run gives each rank of a group `slab` = (part, parts): the group's ranks
read the same examples in the same order (their replica's), augment them alike, and each
keeps slab `part` of `parts` of every example along its first spatial axis, labels alike.

Augmentation draws its randomness from a seed per example, (epoch seed, the example's
position in the epoch): with `deterministic` the position in the global epoch, so that an
example is cropped and flipped alike at any number of processes; and a resumed run augments
as the uninterrupted one would have.
"""
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
_EPOCH_SEED_STRIDE = 1_000_003  # a prime: seeds (seed, epoch) do not collide across seeds


def training_dataset(source, *, rank, size, batch_size, steps_per_epoch, seed, first_epoch=0,
                     first_step=0, shuffle_buffer=10_000, cache="none", deterministic=False,
                     threads=None, slab=(0, 1)):
    """Batches of `batch_size` (per process) for rank `rank` of `size`, epoch after epoch
    from step `first_step` of `first_epoch` on (the batches before it are skipped, as a run
    resumed mid-epoch needs), each epoch exactly `steps_per_epoch` batches, of slab `slab`
    (part, parts) of each example. `seed` is the same on every rank."""
    if deterministic:
        examples_per_epoch = steps_per_epoch * batch_size * size
        shuffle_seed = seed
    else:
        examples_per_epoch = steps_per_epoch * batch_size
        shuffle_seed = seed + rank  # every rank its own order of its own shard
    buffer = min(shuffle_buffer, source.num_examples)
    fixed_records = None
    if cache != "none" or not (source.files and (deterministic or shard_by_file(source, size))):
        fixed_records = _cached(_prepared(source, source.all_records() if deterministic
                                          else _shard(source, rank, size)), cache, source,
                                rank, size, slab, "-unsharded" if deterministic else "")

    def epoch(number):
        records = fixed_records
        if records is None:
            files = _permuted_files(source, seed, number)
            records = _prepared(source, files.flat_map(source.read_file) if deterministic
                                else _shard(source, rank, size, files))
        epoch_seed = shuffle_seed * _EPOCH_SEED_STRIDE + number
        shuffled = records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=True)
        epoch_records = shuffled.repeat().take(examples_per_epoch).enumerate()
        if first_step:
            examples_per_step = examples_per_epoch // steps_per_epoch
            epoch_records = epoch_records.skip(
                tf.cast(number == first_epoch, tf.int64) * first_step * examples_per_step)
        if deterministic:
            epoch_records = epoch_records.filter(_global_batch_slice(rank, size, batch_size))
        return epoch_records.map(lambda index, record: (tf.stack([epoch_seed, index]), record))

    epochs = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch)
    examples = _sliced(_decoded(epochs, source, training=True), slab)
    batches = examples.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    # a spatial group's ranks must see the same examples in the same order
    return batches.with_options(_options(deterministic or slab[1] > 1, threads))


def evaluation_dataset(source, *, rank, size, batch_size, cache="none", repeat=False,
                       threads=None, slab=(0, 1)):
    """Rank `rank`'s disjoint share of the split, in order, in batches of `batch_size` (the
    last one partial), once; or forever with `repeat` (for a fixed number of steps); slab
    `slab` (part, parts) of each example."""
    records = _cached(_prepared(source, _shard(source, rank, size)), cache, source, rank, size,
                      slab)
    if repeat:
        records = records.repeat()
    examples = _sliced(_decoded(records, source, training=False), slab)
    batches = examples.batch(batch_size, drop_remainder=repeat).prefetch(AUTOTUNE)
    return batches.with_options(_options(True, threads))


def shard_by_file(source, size):
    """Whether the split is split among processes by file rather than by example."""
    return len(source.files) >= size


def _permuted_files(source, seed, epoch):
    """The split's files in the order of epoch `epoch`: a permutation keyed by (seed, epoch)."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(source.files), dtype=tf.int64),
        seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))
    return tf.data.Dataset.from_tensor_slices(tf.gather(list(source.files), order))


def _shard(source, rank, size, files=None):
    """Rank `rank`'s share of the split: of its files (in the order of `files`, a dataset of
    paths, by default as listed) or, with fewer files than processes, of its examples."""
    if not shard_by_file(source, size):
        return source.all_records().shard(size, rank)
    if files is None:
        files = tf.data.Dataset.from_tensor_slices(list(source.files))
    files = files.shard(size, rank)
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


def _prepared(source, records):
    """`records` through the source's `prepare` (in parallel), if it has one: before the
    cache, so that the cache keeps what it made."""
    if source.prepare is None:
        return records
    return records.map(source.prepare, num_parallel_calls=AUTOTUNE)


def _cached(records, cache, source, rank, size, slab=(0, 1), scope=""):
    """`cache` is none, memory, or a file path prefix; a file cache is one per split, what
    made it (the source's cache_key), `scope` (what of the split) and rank (each rank of a
    spatial group writes its own), so that no run reads a cache of other data."""
    if cache == "none":
        return records
    if cache == "memory":
        return records.cache()
    key = f".{source.cache_key}" if source.cache_key else ""
    part = f".part{slab[0]}-of-{slab[1]}" if slab[1] > 1 else ""
    return records.cache(f"{cache}.{source.name}{scope}{key}.{rank}-of-{size}{part}")


def _sliced(examples, slab):
    """Slab `part` of `parts` of every (features, label) along its first axis."""
    part, parts = slab
    if parts == 1:
        return examples

    def sliced(features, label):
        planes = features.shape[0] // parts
        return (features[part * planes:(part + 1) * planes],
                label[part * planes:(part + 1) * planes])
    return examples.map(sliced, num_parallel_calls=AUTOTUNE)


def _decoded(records, source, training):
    """Records decoded in parallel (training: (seed, record) pairs, augmented with the
    seed); undecodable ones dropped when the source skips errors."""
    decode = source.decode
    if training:
        def decode(seed, record):
            example = source.decode(*record) if isinstance(record, tuple) else source.decode(record)
            return example if source.augment is None else source.augment(*example, seed)
    examples = records.map(decode, num_parallel_calls=AUTOTUNE)
    return examples.ignore_errors() if source.skip_errors else examples


def _options(deterministic, threads):
    options = tf.data.Options()
    options.deterministic = deterministic
    if threads:
        options.threading.private_threadpool_size = threads
    return options
