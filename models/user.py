"""A user's own Keras 3 model, with nothing added to the project: --model=package.module:function
(a function of (input_shape, num_outputs) that returns a keras.Model, imported from the
PYTHONPATH or the current folder) or --model=path/to/model.keras (a saved model, its weights
included, which training starts from). A pipeline cuts it where one tensor carries everything
from its input to its output (crossings).
"""
import importlib
import os
import re
import traceback
import zipfile

import keras


class UserModelError(ValueError):
    """A --model that names no usable model, and why."""


def is_user_model(name):
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name)) or name.endswith(".keras")


def load(name, input_shape, num_outputs):
    """The model `name` names, for inputs of `input_shape` (without the batch) and
    `num_outputs` outputs. Raises UserModelError when it cannot be had."""
    if name.endswith(".keras"):
        return _saved(name, input_shape)
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name + ".").startswith(error.name + "."):
            raise UserModelError(f"no module {error.name} (it is imported from the PYTHONPATH "
                                 f"or the current folder)") from None
        raise UserModelError(f"importing {module_name}: {_failure(error)}") from None
    except Exception as error:  # the user's module failed as it was imported
        raise UserModelError(f"importing {module_name}: {_failure(error)}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserModelError(f"{module_name} ({module.__file__}) has no function "
                             f"{function_name!r}")
    try:
        model = function(tuple(input_shape), num_outputs)
    except Exception as error:
        raise UserModelError(f"{function_name}{tuple(input_shape), num_outputs}: "
                             f"{_failure(error)}") from None
    if not isinstance(model, keras.Model):
        raise UserModelError(f"{function_name}(input_shape, num_outputs) returned "
                             f"{type(model).__module__}.{type(model).__name__}, not a Keras 3 "
                             f"model (keras.Model)")
    if not hasattr(model, "outputs"):  # a subclassed model: the project reads its outputs
        inputs = keras.Input(tuple(input_shape))
        model = keras.Model(inputs, model(inputs), name=model.name)
    _check_inputs(model, input_shape)
    return model


def _failure(error):
    """The exception as one line, with where it was raised."""
    if isinstance(error, SyntaxError):
        message, where = [error.msg], f"{error.filename}:{error.lineno}"
    else:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        message, where = str(error).strip().splitlines(), f"{frame.filename}:{frame.lineno}"
    return f"{type(error).__name__}{': ' + message[0] if message else ''} ({where})"


def _check_inputs(model, input_shape):
    taken = tuple(model.input_shape[1:]) if len(model.inputs) == 1 else None
    if taken is None or len(taken) != len(input_shape) or any(
            extent not in (None, given) for extent, given in zip(taken, input_shape)):
        raise UserModelError(f"takes inputs of {_shape(taken)}, the data {_shape(input_shape)}"
                             if taken else f"takes several inputs; the data is one of "
                             f"{_shape(input_shape)}")


def _saved(path, input_shape):
    if not os.path.isfile(path):
        raise UserModelError("no such file")
    if not zipfile.is_zipfile(path):
        raise UserModelError("is not a saved Keras model (a .keras file is a zip archive)")
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError) as error:  # Keras' words for a layer it cannot rebuild
        raise UserModelError(f"cannot be loaded: {str(error).splitlines()[0]} (a model with "
                             f"layers of its own: give --model=package.module:function)") from None
    except Exception as error:  # not a .keras file, or a damaged one
        raise UserModelError(f"cannot be loaded: {_failure(error)}") from None
    _check_inputs(model, input_shape)
    return model


def check_outputs(model, wanted, task):
    """Raises UserModelError unless `model` gives one output of shape `wanted` per example,
    as `task` (its name) needs (app.tasks.output_shape)."""
    if len(model.outputs) != 1:
        raise UserModelError(f"has {len(model.outputs)} outputs; the project trains models "
                             f"of one")
    found = tuple(model.output_shape[1:])
    wanted = tuple(wanted)
    if found != wanted:
        kind = ("one output per voxel" if len(found) > 1 else "outputs per example")
        raise UserModelError(f"gives {kind} of shape {_shape(found)}; a {task} data set of "
                             f"these inputs needs {_shape(wanted)}")


def crossings(model):
    """The tensors of `model`'s graph that carry everything from its input to its output, in
    order, the input and output included: where a pipeline can cut it (a stage sends the
    next one tensor). Just [input, output] for a model with none between, and for one whose
    graph the public attributes do not tell whole (a layer called more than once: its
    `input` and `output` are its first call's)."""
    graph = model if hasattr(model, "operations") else keras.Model(model.inputs, model.outputs)
    ends = [graph.inputs[0], graph.outputs[0]]
    operations = [operation for operation in graph.operations  # in topological order
                  if not isinstance(operation, keras.layers.InputLayer)]
    consumed = [[id(tensor) for tensor in keras.tree.flatten(operation.input)]
                for operation in operations]
    produced = [keras.tree.flatten(operation.output) for operation in operations]
    known = {id(ends[0])} | {id(tensor) for outputs in produced for tensor in outputs}
    if any(tensor not in known for inputs in consumed for tensor in inputs):
        return ends
    last_use = {tensor: index for index, inputs in enumerate(consumed) for tensor in inputs}
    found, live = [ends[0]], {id(ends[0])}
    for index, outputs in enumerate(produced[:-1]):
        live = {tensor for tensor in live | {id(output) for output in outputs}
                if last_use.get(tensor, -1) > index}
        if len(outputs) == 1 and live == {id(outputs[0])}:
            found.append(outputs[0])
    return found + ends[1:]


def _shape(shape):
    return "x".join("any" if extent is None else str(extent) for extent in shape)
