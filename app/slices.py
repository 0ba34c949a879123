"""Slices of a seismic volume for a quick look: its middle inline, crossline and time slice,
seismic, label and prediction side by side (TensorBoard's image each epoch; app.predict's
PNG). Volumes are [inlines, crosslines, samples]; 2D sections [crosslines, samples]."""
import io

import numpy as np

SLICES = ("inline", "crossline", "time slice")


def middle_slices(volume):
    """[(name, 2D array)] of a volume's middle inline, crossline and time slice (a 2D
    section: itself; a list of them: as it is)."""
    if isinstance(volume, list):
        return volume
    if volume.ndim == 2:
        return [("section", volume)]
    middle = [extent // 2 for extent in volume.shape]
    return [("inline", volume[middle[0]]), ("crossline", volume[:, middle[1]]),
            ("time slice", volume[:, :, middle[2]])]


def figure_png(columns):
    """PNG bytes of a grid: one row per slice, one column per (title, volume, colormap)."""
    import matplotlib  # only where a figure is drawn: app.train starts without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = middle_slices(columns[0][1])
    figure, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                                figsize=(3 * len(columns), 3 * len(rows)))
    for column, (title, volume, colormap) in enumerate(columns):
        # labels and probabilities on one scale from 0, seismic on its own
        planes = middle_slices(volume)
        highest = max(float(np.max(image)) for _, image in planes)
        scale = {} if column == 0 else {"vmin": 0, "vmax": max(1.0, highest)}
        for row, (name, image) in enumerate(planes):
            axis = axes[row][column]
            # time (depth) downwards, as seismic sections are drawn
            axis.imshow(np.asarray(image).T if name != "time slice" else image,
                        cmap=colormap, aspect="auto", **scale)
            axis.set_title(f"{title}: {name}", fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def columns(seismic, label=None, prediction=None):
    """figure_png's columns for what is given."""
    found = [("seismic", seismic, "gray")]
    if label is not None:
        found.append(("label", label, "viridis"))
    if prediction is not None:
        found.append(("prediction", prediction, "viridis"))
    return found
