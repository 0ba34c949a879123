"""What Horovod's timeline (app.train --timeline, written by rank 0) says a run's rank 0 sent:
every collective it completed, with its tensor's size, from the dtype and shape Horovod
writes at each tensor's end."""
import collections
import json
import math
import re

# Horovod's response types, which open a tensor's collective in the timeline (the other
# events are its negotiation and activities)
COLLECTIVES = ("ALLREDUCE", "ALLGATHER", "BROADCAST", "ALLTOALL", "REDUCESCATTER", "ADASUM")
# Bytes of an element of each type, by the names Horovod writes (its DataType_Name)
_BYTES = {"uint8": 1, "int8": 1, "bool": 1, "uint16": 2, "int16": 2, "float16": 2,
          "bfloat16": 2, "int32": 4, "float32": 4, "int64": 8, "float64": 8}

Sent = collections.namedtuple("Sent", "tensor collective bytes")


def collectives(path):
    """[Sent] of every tensor's collective the timeline at `path` records, in order."""
    with open(path) as timeline:
        events = json.load(timeline)
    names, opened, found = {}, {}, []
    for event in events:
        pid = event.get("pid")
        if event.get("ph") == "M" and event.get("name") == "process_name" and pid:
            names[pid] = event["args"]["name"]
        elif event.get("ph") == "B" and event.get("name") in COLLECTIVES:
            opened[pid] = event["name"]
        elif event.get("ph") == "E" and "shape" in event.get("args", {}):
            extents = [int(extent) for extent in re.findall(r"\d+", event["args"]["shape"])]
            found.append(Sent(names[pid], opened.pop(pid),
                              math.prod(extents) * _BYTES[event["args"]["dtype"]]))
    return found


def bytes_by_kind(sent, kinds):
    """{kind: bytes} of `sent` ([Sent]), a tensor's kind the first of `kinds` ({kind: part of
    a tensor's name}) its name holds, "other" where none."""
    found = collections.Counter()
    for item in sent:
        kind = next((kind for kind, part in kinds.items() if part in item.tensor), "other")
        found[kind] += item.bytes
    return dict(found)
