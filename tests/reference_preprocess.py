"""The float32 preprocessing the library had before it decoded crop windows and stayed uint8.

Frozen here as the reference that ``test_input_pipeline`` compares the current presets with:
the same crop windows, flips and colour noise for the same seed, up to the rounding to uint8.
Takes a fully decoded uint8 HWC image; returns the normalised float32 model input.
"""

import math

import tensorflow as tf

from alexnet_jax import input_pipeline as ip

PCA_NOISE_STD = 0.1
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = ((-0.5675, 0.7192, 0.4009),
          (-0.5808, -0.0045, -0.8140),
          (-0.5836, -0.6948, 0.4203))


def _resize_shorter(image, side):
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = side / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), side)
  return tf.image.resize(image, new, "bilinear", antialias=True)


def _center_crop(image, size):
  shape = tf.shape(image)
  top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def _random_crop(image, size, seed):
  return tf.image.stateless_random_crop(image, (size, size, tf.shape(image)[-1]), seed)


def _pca_noise(image01, seed):
  alpha = tf.random.stateless_normal((3,), seed, stddev=PCA_NOISE_STD)
  rgb = tf.linalg.matvec(tf.constant(EIGVEC), alpha * tf.constant(EIGVAL))
  return image01 + rgb


def random_resized_crop(image, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        attempts=10):
  seeds = tf.random.experimental.stateless_split(seed, 4)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  height, width = shape[0], shape[1]
  area = height * width * tf.random.stateless_uniform((attempts,), seeds[0], *scale)
  log_r = tf.random.stateless_uniform((attempts,), seeds[1], math.log(ratio[0]),
                                      math.log(ratio[1]))
  aspect = tf.exp(log_r)
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32))
  in_ratio = width / height
  fallback_w = tf.where(in_ratio < ratio[0], width,
                        tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  any_ok = tf.reduce_any(ok)
  ch = tf.cast(tf.where(any_ok, h[first], fallback_h), tf.int32)
  cw = tf.cast(tf.where(any_ok, w[first], fallback_w), tf.int32)
  ih, iw = tf.shape(image)[0], tf.shape(image)[1]
  top = tf.where(any_ok, tf.random.stateless_uniform((), seeds[2], 0, ih - ch + 1, tf.int32),
                 (ih - ch) // 2)
  left = tf.where(any_ok, tf.random.stateless_uniform((), seeds[3], 0, iw - cw + 1, tf.int32),
                  (iw - cw) // 2)
  crop = image[top:top + ch, left:left + cw]
  return tf.image.resize(crop, (size, size), "bilinear", antialias=True)


def ten_crop(image, size):
  shape = tf.shape(image)
  bottom, right = shape[0] - size, shape[1] - size
  corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]
  crops = tf.stack([image[t:t + size, l:l + size] for t, l in corners])
  return tf.concat([crops, tf.image.flip_left_right(crops)], axis=0)


def _normalize(pre, image):
  std = (1.0,) * pre.channels if pre.train_preset == "paper" else pre.std
  return (image / 255.0 - tf.constant(pre.mean, tf.float32)) / tf.constant(std, tf.float32)


def train(pre: ip.Preprocess, image, seed):
  crop_seed, flip_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  image = tf.cast(image, tf.float32)
  if pre.train_preset == "paper":
    image = _center_crop(_resize_shorter(image, pre.resize_size), pre.resize_size)
    image = _random_crop(image, pre.image_size, crop_seed)
  elif pre.train_preset == "torchvision":
    image = random_resized_crop(image, pre.image_size, crop_seed)
  else:
    image = tf.image.resize(image, (pre.image_size, pre.image_size), "bilinear", antialias=True)
    image = tf.pad(image, [[pre.pad, pre.pad], [pre.pad, pre.pad], [0, 0]])
    image = _random_crop(image, pre.image_size, crop_seed)
  if pre.train_preset != "small_noflip":
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if pre.train_preset == "paper":
    image = _pca_noise(image / 255.0, colour_seed) * 255.0
  return _normalize(pre, image)


def evaluate(pre: ip.Preprocess, image):
  image = tf.cast(image, tf.float32)
  if pre.eval_preset == "small":
    image = tf.image.resize(image, (pre.image_size, pre.image_size), "bilinear", antialias=True)
  else:
    image = _resize_shorter(image, pre.resize_size)
    if pre.train_preset == "paper":
      image = _center_crop(image, pre.resize_size)
    image = (ten_crop if pre.eval_preset == "ten_crop" else _center_crop)(image, pre.image_size)
  return _normalize(pre, image)
