"""Random 224x224 images and 1,000 classes: speed measurements of `alexnet`, no dataset needed."""

from configs import default


def get_config():
  c = default.get_config()
  c.model = "alexnet"
  c.dataset = "synthetic"
  c.train_split, c.eval_split = "train", "test"
  c.train_preset, c.eval_preset = "small", "small"
  c.image_size, c.resize_size, c.channels, c.pad = 224, 224, 3, 0
  c.mean = (0.485, 0.456, 0.406)
  c.std = (0.229, 0.224, 0.225)
  c.batch_size = 64
  c.num_epochs = -1.0
  c.num_train_steps = 50
  c.schedule = "constant"
  c.warmup_epochs = 0.0
  c.eval_every_epochs = 0.0
  c.log_every_steps = 5
  return c
