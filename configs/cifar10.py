"""alexnet_small widened to 3 channels on CIFAR-10 (32x32): pad-and-crop + flip."""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "cifar10"
  c.train_split, c.eval_split = "train", "test"
  c.model_overrides.input_size = 32
  c.train_preset, c.eval_preset = "small", "small"
  c.image_size, c.resize_size, c.channels, c.pad = 32, 32, 3, 4
  c.mean = (0.4914, 0.4822, 0.4465)
  c.std = (0.2470, 0.2435, 0.2616)
  c.batch_size = 128
  c.num_epochs = 60.0
  c.learning_rate = 0.02
  c.warmup_epochs = 2.0
  c.eval_every_epochs = 5.0
  c.log_every_steps = 50
  return c
