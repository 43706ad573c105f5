"""The input pipeline, in the order the data goes (needs the ``train`` extra; no TensorFlow).

- ``sources``: a split's examples as ``len()`` and ``source[i] -> (image, label)``: TFDS
  datasets (``tfds.data_source``), image folders, arrays, ``digits``, ``synthetic``;
- ``order``: the one global order (per-epoch permutation, per-example randomness from
  (seed, epoch, position)), whatever the number of processes;
- ``host``: decode and crop on the host (``Preprocess`` and its preset tables), uint8 out;
- ``loader``: Grain datasets that yield each process's rows of every global batch, eval batches
  that cover a split once, and ``prefetch_to_device``;
- ``device``: the rest of preprocessing inside the jitted steps (flip, colour, normalisation).

Nothing is imported here, so that ``alexnet_jax.data.device`` stays as light as jax.
"""
