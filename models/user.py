"""A user's own Keras 3 model, with nothing added to the project: --model=package.module:function
(a function of (input_shape, num_outputs) that returns a keras.Model, imported from the
PYTHONPATH or the current folder) or --model=path/to/model.keras (a saved model, its weights
included, which training starts from). Either is one block: a pipeline does not cut it.
"""
import importlib
import os

import keras


class UserModelError(ValueError):
    """A --model that names no usable model, and why."""


def is_user_model(name):
    return ":" in name or name.endswith(".keras")


def load(name, input_shape, num_outputs):
    """The model `name` names, for inputs of `input_shape` (without the batch) and
    `num_outputs` outputs. Raises UserModelError when it cannot be had."""
    if name.endswith(".keras"):
        return _saved(name, input_shape)
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UserModelError(f"no module {error.name} (it is imported from the PYTHONPATH "
                             f"or the current folder)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserModelError(f"{module_name} ({module.__file__}) has no function "
                             f"{function_name!r}")
    model = function(tuple(input_shape), num_outputs)
    if not isinstance(model, keras.Model):
        raise UserModelError(f"{function_name}(input_shape, num_outputs) returned "
                             f"{type(model).__module__}.{type(model).__name__}, not a Keras 3 "
                             f"model (keras.Model)")
    return model


def _saved(path, input_shape):
    if not os.path.isfile(path):
        raise UserModelError("no such file")
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError) as error:  # Keras' words for a layer it cannot rebuild
        raise UserModelError(f"cannot be loaded: {str(error).splitlines()[0]} (a model with "
                             f"layers of its own: give --model=package.module:function)") from None
    saved = tuple(model.input_shape[1:])
    if saved != tuple(input_shape):
        raise UserModelError(f"takes inputs of {_shape(saved)}, the data {_shape(input_shape)}")
    return model


def check_outputs(model, task, input_shape, num_outputs):
    """Raises UserModelError unless `model`'s outputs are what `task` needs: a segmentation
    model's, `num_outputs` per voxel of the input; the other tasks', `num_outputs`."""
    if len(model.outputs) != 1:
        raise UserModelError(f"has {len(model.outputs)} outputs; the project trains models "
                             f"of one")
    found = tuple(model.output_shape[1:])
    wanted = ((*tuple(input_shape)[:-1], num_outputs) if task == "segmentation"
              else (num_outputs,))
    if found != wanted:
        kind = ("one output per voxel" if len(found) > 1 else "outputs per example")
        raise UserModelError(f"gives {kind} of shape {_shape(found)}; a {task} data set of "
                             f"these inputs needs {_shape(wanted)}")


def _shape(shape):
    return "x".join(str(extent) for extent in shape)
