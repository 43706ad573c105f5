"""torchvision's AlexNet recipe on ImageNet (the IMAGENET1K_V1 weights: 56.5% / 79.1%).

8 GPUs x 32 = batch 256, lr .01, momentum .9, weight decay 1e-4, lr x0.1 every 30 epochs, 90
epochs, RandomResizedCrop(224) + flip, eval resize 256 + centre crop 224. Fastest from a store
with the shorter side at 256: ``python -m alexnet_jax.prepare imagenet2012 STORE --mode shorter``,
then ``--config.dataset=prepared:STORE``.
"""

from alexnet_jax import optim
from configs import default


def get_config():
  c = default.get_config()
  c.model = "alexnet"
  c.model_overrides.weight_init = None  # the variant's own: PyTorch's default init
  c.dataset = "imagenet2012"
  c.train_split, c.eval_split = "train", "validation"
  c.train_preset, c.eval_preset = "torchvision", "center_crop"
  c.image_size, c.resize_size, c.channels = 224, 256, 3
  c.mean = (0.485, 0.456, 0.406)
  c.std = (0.229, 0.224, 0.225)
  c.batch_size = 256
  c.num_epochs = 90.0
  c.update(optim.TORCHVISION_RECIPE)  # lr .01, momentum .9, wd 1e-4, x0.1 every 30 epochs
  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 2000
  c.parallel = "pmap"
  return c
