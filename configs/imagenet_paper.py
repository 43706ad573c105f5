"""The 2012 paper's recipe: alexnet_paper, batch 128, lr .01 divided by 10 when the validation
error plateaus, momentum .9, weight decay 5e-4, paper init and augmentation, 10-crop eval, 90
epochs. Set ``--config.schedule=multistep`` to drop at fixed epochs instead.

Fastest from the paper's own storage, a store of 256x256 images:
``python -m alexnet_jax.prepare imagenet2012 STORE --mode paper --size 256``, then
``--config.dataset=prepared:STORE``."""

from configs import imagenet_torchvision


def get_config():
  c = imagenet_torchvision.get_config()
  c.model = "alexnet_paper"
  c.model_overrides.weight_init = "paper"
  c.train_preset, c.eval_preset = "paper", "ten_crop"
  c.std = (1.0, 1.0, 1.0)  # the paper only subtracts the mean
  c.batch_size = 128
  c.learning_rate = 0.01
  c.weight_decay = 5e-4
  c.momentum_rule = "paper"
  c.schedule = "plateau"
  c.plateau_patience = 3  # epochs (one evaluation per epoch)
  c.lr_milestones_epochs = (30, 60, 80)  # for --config.schedule=multistep
  return c
