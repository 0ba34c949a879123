"""The plan of a pipelined run, apart from its runtime (app.parallel.pipeline): where each rank sits
(its stage and its replica), the order of a stage's passes in a step, and the cut of the
model's blocks into stages, with the record of that cut beside the checkpoints. Pure Python:
no TensorFlow or Horovod, so that the launcher's and the flags' checks and the tests of the
schedules need neither.

Ranks are laid out pipeline by pipeline: rank = replica * stages + stage, so that the ranks
that pass activations to each other are neighbours (on one node where they fit).
"""
import collections
import json
import os

import numpy as np

# A rank's pipeline stage (of `stages`), its data-parallel replica (of `replicas`) and, in a
# spatially parallel run, its slab of each example (`part` of `parts`).
Position = collections.namedtuple("Position", "stage stages replica replicas part parts",
                                  defaults=(0, 1))
Position.first = property(lambda self: self.stage == 0)
Position.last = property(lambda self: self.stage == self.stages - 1)
# the rank that saves its stage's checkpoints: the stage's first replica's first slab
Position.saves = property(lambda self: self.replica == 0 and self.part == 0)


def position(rank, size, stages):
    """Where rank `rank` of `size` sits: its stage and its replica."""
    return Position(rank % stages, stages, rank // stages, size // stages)


def stage_ranks(stage, stages, size):
    """The ranks that hold stage `stage`: one per replica."""
    return list(range(stage, size, stages))


SCHEDULES = ("gpipe", "1f1b")


def schedule(kind, where, microbatches):
    """The order of this stage's passes in a step: ("forward" or "backward", microbatch)."""
    forward = [("forward", index) for index in range(microbatches)]
    if kind == "gpipe":
        return forward + [("backward", index) for index in reversed(range(microbatches))]
    ahead = min(where.stages - where.stage - 1, microbatches)  # forwards before the first
    order = forward[:ahead]
    for index in range(microbatches):  # then one forward (while any is left), one backward
        if ahead + index < microbatches:
            order.append(forward[ahead + index])
        order.append(("backward", index))
    return order


BALANCES = ("flops", "parameters")


def cut(blocks, stages, balance_by):
    """Each stage's (first, last) block (last exclusive; None: to the end): the model's
    blocks (models.blocks_of) cut into `stages` balanced by `balance_by`, one of BALANCES:
    their forward FLOPs (the stages' compute) or their parameters."""
    if stages == 1:
        return [(0, None)]
    return balance([getattr(block, balance_by) for block in blocks], stages)


CUT_RECORD = "stages.json"


class CutError(ValueError):
    """Checkpoints saved from stages cut otherwise than this run cuts the model."""


def check_cut(model_dir, model_name, stage_blocks):
    """Raises CutError when `model_dir`'s checkpoints were saved from stages other than
    `stage_blocks` (cut's list) of `model_name`: a stage's checkpoint restores only into the
    blocks it was saved from. Runs from before the record have none, and pass."""
    path = os.path.join(model_dir, "checkpoints", CUT_RECORD)
    if not os.path.exists(path):
        return
    with open(path) as record:
        saved = json.load(record)
    this = _cut_record(model_name, stage_blocks)
    if saved != this:
        raise CutError(f"{path}: its checkpoints hold {saved['model']} in stages of blocks "
                       f"{saved['stages']}, this run cuts {this['model']} into "
                       f"{this['stages']}; resume with the flags they were trained with "
                       f"(--model, --pipeline_stages, --pipeline_balance)")


def record_cut(model_dir, model_name, stage_blocks):
    """Writes which blocks each stage's checkpoints hold beside them (check_cut reads it)."""
    os.makedirs(os.path.join(model_dir, "checkpoints"), exist_ok=True)
    with open(os.path.join(model_dir, "checkpoints", CUT_RECORD), "w") as record:
        json.dump(_cut_record(model_name, stage_blocks), record)


def _cut_record(model_name, stage_blocks):
    return {"model": model_name, "stages": [list(bounds) for bounds in stage_blocks]}


def balance(sizes, stages):
    """Cuts blocks of `sizes` (FLOPs or parameters) into `stages` consecutive non-empty
    groups whose largest is as small as it can be; returns each group's (first, last) block,
    last exclusive, as ints."""
    count = len(sizes)
    prefix = np.concatenate([[0], np.cumsum(sizes)])
    # best[s][i]: the smallest largest group when the first i blocks make s groups
    best = np.full((stages + 1, count + 1), np.inf)
    starts = np.zeros((stages + 1, count + 1), dtype=int)
    best[0][0] = 0
    for groups in range(1, stages + 1):
        for end in range(groups, count + 1):
            for start in range(groups - 1, end):
                largest = max(best[groups - 1][start], prefix[end] - prefix[start])
                if largest < best[groups][end]:
                    best[groups][end], starts[groups][end] = largest, start
    bounds, end = [], count
    for groups in range(stages, 0, -1):
        bounds.append((int(starts[groups][end]), end))
        end = int(starts[groups][end])
    return bounds[::-1]
