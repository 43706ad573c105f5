"""The offline quickstart, and the defaults every other config starts from.

``alexnet_small`` on scikit-learn's bundled handwritten ``digits`` (28x28 grey, no download):
a few minutes on a 2-core CPU to >= 95% test accuracy. Any field can be overridden on the command
line: ``python train.py --config configs/default.py --config.batch_size=64``.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from alexnet_jax import optim
from alexnet_jax.models import SETTINGS, AlexNet


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Model: a name from alexnet_jax.VARIANTS. model_overrides can set any AlexNet field (None =
  # the variant's value; num_classes and in_channels default to the dataset's and `channels`).
  c.model = "alexnet_small"
  c.model_overrides = ml_collections.ConfigDict({
      f.name: config_dict.placeholder(type(f.default)) for f in dataclasses.fields(AlexNet)
      if f.name in SETTINGS and f.name not in ("dtype", "param_dtype")})
  # This deep net without normalisation barely trains from PyTorch's default init (the signal
  # shrinks ~6x in variance per layer); the half-width variant's
  # kaiming init starts learning within 2 epochs.
  c.model_overrides.weight_init = "kaiming"
  c.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)

  # Data: `digits`, `synthetic`, `folder:/path`, `prepared:/path` (a store written by
  # `python -m alexnet_jax.prepare`) or a TFDS name (imagenet2012, cifar10, ...).
  c.dataset = "digits"
  c.train_split = "train"
  c.eval_split = "test"
  c.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
  c.manual_dir = ""  # where manually downloaded archives are (imagenet2012)
  c.train_preset = "small_noflip"  # paper | torchvision | small | small_noflip
  c.eval_preset = "small"  # center_crop | ten_crop | small
  c.image_size = 28
  c.resize_size = 28  # shorter side before cropping (paper/torchvision/center_crop/ten_crop)
  c.channels = 1
  c.pad = 2  # small presets: pixels of zero padding before the random crop
  c.mean = (0.5,)  # per channel, pixels in [0, 1]
  c.std = (0.5,)
  c.prefetch = 2  # batches kept in flight to the devices
  # Host work (read, decode, crop) per process: threads of the process (0 = one per core), and
  # Grain worker processes beside it (0 = none). Neither changes the batches.
  c.data_threads = 0
  c.data_workers = 0

  # Optimisation (alexnet_jax.optim).
  c.batch_size = 32  # global, over all devices and processes
  c.eval_batch_size = 0  # 0 = batch_size
  c.num_epochs = 8.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.schedule = "cosine"  # constant | step | multistep | cosine | plateau
  # The other optimizer fields, with the library's defaults: lr_scaling, lr_base_batch_size,
  # nesterov, momentum_rule, weight_decay_on_biases, lr_decay_factor, lr_step_epochs,
  # lr_milestones_epochs, warmup_epochs, plateau_patience/rtol/min_scale (alexnet_jax/optim.py
  # says what each means).
  c.update(optim.DEFAULTS)
  c.warmup_epochs = 0.25  # the quickstart's
  c.label_smoothing = 0.0

  # Parallelism: pmap (replicated state, batch with a leading device axis), jit (shard_map
  # over a mesh of all devices) or hybrid (convolutions data-parallel, dense layers split over
  # model_parallel devices: "One weird trick").
  c.parallel = "jit"
  c.model_parallel = 1  # hybrid only: devices on the model axis; divides the device count
  c.seed = 0

  # Logging, evaluation and checkpoints.
  c.log_every_steps = 20
  c.eval_every_steps = 0  # 0: use eval_every_epochs
  c.eval_every_epochs = 3.0
  c.checkpoint_every_steps = 0  # 0: checkpoint at every evaluation and at the end
  c.keep_checkpoints = 3  # the last N, plus the best by eval top-1
  c.async_checkpointing = True
  c.tensorboard = True
  c.eval_checkpoint = "latest"  # --mode eval: latest | best
  c.halt_at_step = -1  # > 0: checkpoint and stop there (then rerun to resume)
  # A rerun in a workdir resumes its checkpoint; a change of any field that alters the run
  # (model, data, preprocessing, batch, seed, optimizer, schedule, dtype, a shorter run) stops
  # it with the list of changes, unless this is True.
  c.allow_config_change = False

  # Start from other weights: published ones ("torchvision", for alexnet), an Orbax
  # workdir/checkpoint, a PyTorch .pth or a converted .msgpack.
  c.init_from = ""
  c.init_replace_head = False  # start the classifier afresh when its class count differs
  return c
