"""alexnet on Imagenette (10 easy ImageNet classes, TFDS `imagenette/full-size-v2`), torchvision
augmentation; a faster check of the ImageNet pipeline and recipe."""

from configs import imagenet_torchvision


def get_config():
  c = imagenet_torchvision.get_config()
  c.dataset = "imagenette/full-size-v2"
  c.batch_size = 128
  c.num_epochs = 60.0
  c.schedule = "cosine"
  c.warmup_epochs = 2.0
  c.learning_rate = 0.02
  c.weight_decay = 5e-4
  c.checkpoint_every_steps = 0
  c.log_every_steps = 20
  return c
